"""Clean and robust accuracy per policy, batch size, threat model and attack, and the drift evidence.

Every robust figure names its threat model, attack, epsilon, steps, batch size and policy
(``docs/evaluation.md``); many small batches run in one forward through grouped statistics, so small batch
sizes stay cheap. One job per module, data flowing down the list:

- :mod:`.threats`: threat models parsed once into :class:`~.threats.Threat`; gradients and their losses;
- :mod:`.cells`: :class:`~.cells.Cell`, one robust cell (frozen, checked when built), and its record;
- :mod:`.plan`: the grids, the cells of a grid, their cost order, filters, and which cells repeat others;
- :mod:`.craft`: adversarial batches for a cell (threat-model placement, the gradient's forward);
- :mod:`.run`: :func:`~.run.run_cell`, one cell's figures;
- :mod:`.evidence`: drift per layer and ROC AUC of the drift scores on shifted batches;
- :mod:`.grid`: :func:`~.grid.evaluate_model`, one model's clean sections and robust cells, resumable;
- :mod:`.store`: the results file (identity, atomic writes, resume, merge);
- :mod:`.cli`: ``robustnorm evaluate``.

Importing this package imports none of them (the command line lists its subcommands without loading torch).
"""
