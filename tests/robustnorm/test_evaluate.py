"""The evaluation package's building blocks: threat models, cells, batches, records, plans, results, policy choice."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from robustnorm import ModelCard, calibrate_drift, create_model, set_policy
from robustnorm.calibrate import calibrate, choose_policy
from robustnorm.data import CIFAR10_CLASSES, make_generator, normalize
from robustnorm.evaluation import craft as crafting
from robustnorm.evaluation import run as running
from robustnorm.evaluation.cells import Cell
from robustnorm.evaluation.craft import assemble_batches, craft
from robustnorm.evaluation.grid import evaluate_model, skewed_order
from robustnorm.evaluation.plan import (
    GRIDS,
    Grid,
    attack_images,
    in_cost_order,
    policies,
    robust_cells,
    same_computation,
)
from robustnorm.evaluation.run import distinct_predictions, run_cell, split_pool
from robustnorm.evaluation.threats import parse_threat
from robustnorm.scoring import accuracy, predictions


@pytest.fixture(scope="module")
def model_and_card() -> tuple[torch.nn.Module, ModelCard]:
    torch.manual_seed(0)
    model = create_model("resnet20", norm="robustnorm", p=1.0)
    model.train()
    with torch.no_grad():
        model(torch.randn(64, 3, 32, 32))
    card = ModelCard(name="tiny", architecture="resnet20", norm="robustnorm", p=1.0, labels=list(CIFAR10_CLASSES),
                     policy="adaptive:4")
    return model.eval(), card


def images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 32, 32, generator=generator), torch.randint(0, 10, (n,), generator=generator)


@pytest.mark.parametrize("classes", [1, 2, 5])
def test_skewed_batches_hold_only_the_given_number_of_classes(classes: int) -> None:
    labels = torch.arange(10).repeat_interleave(40)
    order = skewed_order(labels, 16, classes)
    assert order.numel() >= 300 and order.numel() % 16 == 0
    assert len(set(order.tolist())) == order.numel()
    for batch in labels[order].view(-1, 16):
        assert len(batch.unique()) == classes


def test_lone_attacker_batches_hold_n_minus_one_clean_images(model_and_card: tuple) -> None:
    model, card = model_and_card
    x, y = images(32)
    eps = 8 / 255
    crafted = craft(model, card, x, y, Cell.parse("batch", 8, "lone", "pgd", 8, "adaptive"), steps=3,
                    generator=make_generator(0))
    for batch, clean, mask in zip(crafted.images.view(4, 8, -1), x.view(4, 8, -1), crafted.mask.view(4, 8)):
        identical = (batch == clean).all(dim=1)
        assert int(identical.sum()) == 7 and int(mask.sum()) == 1
        assert not identical[mask].any()
        assert (batch[mask] - clean[mask]).abs().max() <= eps + 1e-6
    assert torch.equal(crafted.scored, crafted.mask)


def test_poisoning_scores_the_victims(model_and_card: tuple) -> None:
    model, card = model_and_card
    x, y = images(16)
    crafted = craft(model, card, x, y, Cell.parse("batch", 8, "poison:3", "pgd", 25.5, "adaptive"), steps=2,
                    generator=make_generator(0))
    assert int(crafted.mask.sum()) == 6 and torch.equal(crafted.scored, ~crafted.mask)
    assert torch.equal(crafted.images[~crafted.mask], x[~crafted.mask])


@pytest.mark.parametrize("threat, gradient", [("whole", "adaptive"), ("lone", "transfer"), ("fraction:0.5", "adaptive"),
                                              ("fraction:0.5", "transfer"),
                                              ("lone", "unknown"), ("whole", "margin"), ("fraction:0.5", "margin")])
def test_robust_record_is_consistent(model_and_card: tuple, threat: str, gradient: str) -> None:
    model, card = model_and_card
    x, y = images(24)
    pool, pool_labels = images(40)
    record = run_cell(model, card, x, y, Cell.parse("adaptive:4", 8, threat, "pgd", 4, gradient), steps=2,
                      pool=pool[24:], pool_labels=pool_labels[24:])
    attackers = {"whole": 24, "lone": 24, "fraction:0.5": 24}[threat]  # every image of x is scored
    batches = {"whole": 3, "lone": 24, "fraction:0.5": 6}[threat]
    assert record.scored_images == attackers and record.images == 8 * batches
    assert record.steps == 2 and record.eps_255 == 4
    assert 0 <= record.robust_accuracy <= 1 and 0 <= record.clean_accuracy <= 1
    assert (record.clean_batchmates_accuracy is None) == (threat == "whole")
    # The frozen reference is the same attack (the margin gradient's loss included) crafted against frozen.
    frozen = run_cell(model, card, x, y, Cell.parse("frozen", 1, "whole", "pgd", 4, "margin" if gradient == "margin"
                                                    else "adaptive"), steps=2)
    assert record.frozen_attack_accuracy == frozen.robust_accuracy == frozen.frozen_attack_accuracy


def test_assembled_lone_attacker_batches_hold_each_image_once_with_clean_pool_batchmates() -> None:
    x, y = images(12)
    pool, pool_labels = torch.rand(20, 3, 32, 32), torch.randint(0, 10, (20,))
    batch, labels, mask, order = assemble_batches(x, y, pool, pool_labels, n=8, k=1, generator=make_generator(0))
    assert batch.shape[0] == 12 * 8 and mask.view(12, 8).sum(dim=1).eq(1).all()
    assert torch.equal(mask, order < 12) and torch.equal(order[mask], torch.arange(12))
    assert torch.equal(batch, torch.cat([x, pool])[order])
    assert torch.equal(batch[mask], x) and torch.equal(labels[mask], y)  # each attacker once, in order
    pool_rows = pool.flatten(1)
    for group in batch[~mask].view(12, 7, -1):
        matches = (group[:, None] == pool_rows[None]).all(dim=2)
        assert matches.any(dim=1).all() and len(set(matches.float().argmax(dim=1).tolist())) == 7  # distinct
    batch, labels, mask, order = assemble_batches(x, y, pool, pool_labels, n=8, k=3, generator=make_generator(0))
    source = order[mask]
    assert sorted(source.tolist()) == list(range(12)) and torch.equal(batch[mask], x[source])
    with pytest.raises(ValueError, match="cannot fill"):
        assemble_batches(x, y, pool[:3], pool_labels[:3], n=8, k=1, generator=make_generator(0))


def test_frozen_predictions_run_each_distinct_image_once_and_agree(model_and_card: tuple) -> None:
    model, card = model_and_card
    x, y = images(12)
    pool, pool_labels = images(40)
    batch, _, _, order = assemble_batches(x, y, pool[12:], pool_labels[12:], n=8, k=1, generator=make_generator(0))
    seen = []
    hook = model.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].shape[0]))
    try:
        distinct = distinct_predictions(model, card, batch, order)
    finally:
        hook.remove()
    assert sum(seen) == order.unique().numel() < batch.shape[0]
    assert torch.equal(distinct, predictions(model, card, batch, "frozen", 8))


def test_grouped_predictions_equal_batch_by_batch(model_and_card: tuple) -> None:
    model, card = model_and_card
    x, y = images(20)
    grouped = predictions(model, card, x, "batch", 4)
    one_by_one = torch.cat([predictions(model, card, x[i:i + 4], "batch", 4) for i in range(0, 20, 4)])
    assert torch.equal(grouped, one_by_one)
    assert accuracy(model, card, x, y, "batch", 4) == float((grouped == y).float().mean())


def test_choose_policy_picks_min_batch_and_n0() -> None:
    sizes = [1, 2, 4, 8, 16, 32, 64]
    table = {"frozen": dict.fromkeys(sizes, 0.80),
             "batch": {1: 0.2, 2: 0.4, 4: 0.6, 8: 0.79, 16: 0.81, 32: 0.83, 64: 0.84},
             "blend:4": dict.fromkeys(sizes, 0.82), "blend:16": dict.fromkeys(sizes, 0.83)}
    assert choose_policy(table, robust=True) == ("adaptive:16", None, 16)
    assert choose_policy(table, robust=False) == ("adaptive:32:blend:16", 16.0, 32)
    never = dict(table, batch=dict.fromkeys(sizes, 0.1))
    assert choose_policy(never, robust=True) == ("frozen", None, None)


def test_calibrate_records_its_choice_and_can_deploy_and_calibrate_another_policy(
        model_and_card: tuple[torch.nn.Module, ModelCard]) -> None:
    model, card = model_and_card
    x, y = images(32)
    options = {"sizes": (1, 4), "n0_candidates": (4.0,), "batches_per_size": 4}
    chosen = calibrate(model, dataclasses.replace(card, evaluation={}), x, y, **options)
    measured = chosen.evaluation["calibration"]["policy"]
    assert chosen.policy == measured and "deployed_policy" not in chosen.evaluation["calibration"]
    forced = calibrate(model, dataclasses.replace(card, evaluation={}), x, y, policy="batch", **options)
    assert forced.policy == "batch" and forced.evaluation["calibration"]["deployed_policy"] == "batch"
    assert forced.evaluation["calibration"]["policy"] == measured  # the measurement still says what it chose
    # The batch score is calibrated under the deployed statistics, so its clean centre differs from frozen's.
    assert forced.calibration.log_kl_mean != calibrate_drift(
        set_policy(model, "frozen"), normalize(x, card.mean, card.std), batch_sizes=(1, 4),
        batches_per_size=4).log_kl_mean
    with pytest.raises(ValueError, match="policy"):
        calibrate(model, dataclasses.replace(card, evaluation={}), x, y, policy="often", **options)


def test_roc_auc_reference_values() -> None:
    from robustnorm.evaluation.evidence import roc_auc

    assert roc_auc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert roc_auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0
    assert roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.5


def test_drift_evidence_separates_noise_from_clean(model_and_card: tuple) -> None:
    from robustnorm.corruptions import CORRUPTIONS
    from robustnorm.evaluation.evidence import drift_evidence

    card = dataclasses.replace(model_and_card[1])
    torch.manual_seed(5)
    model = create_model("resnet20", norm="robustnorm", p=1.0).train()
    with torch.no_grad():  # running statistics of the clean distribution (uniform pixels)
        for _ in range(40):
            model(normalize(torch.rand(32, 3, 32, 32)))
    model.eval()
    card.calibration = calibrate_drift(model, normalize(torch.rand(256, 3, 32, 32)), batch_sizes=(8,),
                                       batches_per_size=16)
    x, y = images(32)
    result = drift_evidence(model, card, x, y, n=8, steps=1)
    assert set(result["auc"]) == {"pgd_whole", "pgd_lone", *CORRUPTIONS} and "contrast" in CORRUPTIONS
    assert set(result["layers"]["clean"]["bn1"]) == {"mean_shift", "log_var_ratio", "kl"}
    assert result["layers"]["contrast"]["bn1"]["kl"] > result["layers"]["clean"]["bn1"]["kl"]
    assert result["auc"]["contrast"]["batch_score"] > 0.9


def test_evaluate_command_runs_the_grid_and_resumes_without_recomputing(cifar10: object, tmp_path: object) -> None:
    import json

    from robustnorm.cli import main as cli

    out = tmp_path / "robustness.json"
    argv = ["evaluate", "--models", "cifar10-resnet20-robustnorm", "--grid", "smoke", "--robust-images", "10",
            "--test-images", "200", "--sections", "grid", "--device", "cpu", "--data", str(cifar10), "--out", str(out)]
    assert cli(argv) == 0
    first = json.loads(out.read_text())["models"][0]
    cells = {(r["policy"], r["n"], r["threat"], r["attack"], r["eps_255"], r["gradient"]) for r in first["robust"]}
    assert len(cells) == len(first["robust"]) > 10
    for record in first["robust"]:
        n = record["n"]
        if record["threat"] == "whole":  # consecutive batches of the subset
            assert record["scored_images"] == record["images"] == 10 - 10 % n
        if record["threat"] == "lone":  # every subset image attacks once, each in its own batch of n
            assert record["scored_images"] == 10 and record["images"] == 10 * n
        assert record["frozen_attack_accuracy"] is not None or record["threat"].startswith("poison")
    assert cli([*argv, "--resume"]) == 0
    resumed = json.loads(out.read_text())
    again = resumed["models"][0]
    assert again["robust"] == first["robust"] and again["clean"] == first["clean"]
    assert resumed["device"] == f"cpu (torch {torch.__version__})"  # both runs' device, named once
    # a cheap pass that leaves out the costly cells, then the rest with --resume, gives the same cells
    cheap_out = tmp_path / "cheap.json"
    cheap = [*argv[:-1], str(cheap_out), "--max-cell-images", "20"]
    assert cli(cheap) == 0
    left = json.loads(cheap_out.read_text())["models"][0]["robust"]
    missing = cells - {(r["policy"], r["n"], r["threat"], r["attack"], r["eps_255"], r["gradient"]) for r in left}
    # batch statistics at n = 8 (the card's auto policy adapts too): the lone attacker (10 x 8 images) and its
    # EOT variant (x 4) cost more than 20
    adaptive_policies = ("batch", first["policy"])
    assert first["policy"].startswith("auto:")
    assert missing == {(policy, 8, "lone", "pgd", 8.0, gradient) for policy in adaptive_policies
                       for gradient in ("adaptive", "unknown")}
    copies = [tmp_path / "adaptive.json", tmp_path / "unknown.json", tmp_path / "merged.json"]
    for copy in copies:
        copy.write_text(cheap_out.read_text())
    assert cli([*argv[:-1], str(cheap_out), "--resume"]) == 0
    filled = json.loads(cheap_out.read_text())["models"][0]["robust"]
    def timeless(records: list[dict]) -> list[str]:
        return sorted(str({key: value for key, value in r.items() if key != "seconds"}) for r in records)

    assert timeless(filled) == timeless(again["robust"])  # the same attacks, the same numbers
    # ... and so do two processes, each resuming a copy with one slice of what is missing, merged afterwards
    for copy, gradient in zip(copies, ("adaptive", "unknown")):
        assert cli([*argv[:-1], str(copy), "--resume", "--only-policies", *adaptive_policies,
                    "--only-gradients", gradient]) == 0
        assert len(json.loads(copy.read_text())["models"][0]["robust"]) == len(left) + 2
    assert cli(["evaluate", "--out", str(copies[2]), "--merge", str(copies[0]), str(copies[1])]) == 0
    assert timeless(json.loads(copies[2].read_text())["models"][0]["robust"]) == timeless(filled)
    assert cli(["evaluate", "--out", str(copies[2]), "--merge", str(out)]) == 0  # nothing new, nothing changed
    assert timeless(json.loads(copies[2].read_text())["models"][0]["robust"]) == timeless(filled)
    # --only-sizes / --only-threats run a slice of the robust cells, with the same numbers
    only_out, size = tmp_path / "only.json", min(cell[1] for cell in cells)
    assert cli([*argv[:-1], str(only_out), "--only-sizes", str(size), "--only-threats", "whole"]) == 0
    kept = json.loads(only_out.read_text())["models"][0]["robust"]
    assert {(r["n"], r["threat"]) for r in kept} == {(size, "whole")}
    assert len(kept) == sum(1 for cell in cells if cell[1] == size and cell[2] == "whole")
    assert set(timeless(kept)) <= set(timeless(again["robust"]))


def test_adaptive_cells_reuse_the_cells_whose_statistics_they_run(model_and_card: tuple) -> None:
    model, card = model_and_card  # policy adaptive:4 on RobustNorm: frozen below 4 images, batch from 4
    x, y = images(16)
    pool, pool_labels = images(40)
    grid = Grid(clean_sizes=(1, 8), blend_n0=(), skew_sizes=(), skew_classes=(), robust_sizes=(1, 8),
                robust_eps_255=(8,), robust_threats=("whole", "lone"), robust_gradients=("adaptive", "transfer"),
                sweep_size=8, sweep_eps_255=(8,), extra_size=8, extra_threats=(), steps=2)
    results = evaluate_model(model, card, x, y, x, y, grid, pool=pool[16:], pool_labels=pool_labels[16:])
    cells = {(r["policy"], r["n"], r["threat"], r["eps_255"], r["attack"], r["gradient"]): r for r in results["robust"]}
    for (policy, n, *rest), record in cells.items():
        frozen_at_n = policy == "frozen" or (policy == "adaptive:4" and n < 4)
        if record["gradient"] != "adaptive" and frozen_at_n:
            # frozen statistics: the adaptive attack is the per-image frozen attack, as transfer and unknown are
            twin = "frozen" if policy == "frozen" else "frozen, adaptive gradient"
            assert record["same_as"] in ("frozen, adaptive gradient", twin) and record["seconds"] == 0
            assert record["robust_accuracy"] == cells[("frozen", n, *rest[:-1], "adaptive")]["robust_accuracy"]
            continue
        if policy != "adaptive:4":
            assert record["same_as"] is None
            continue
        twin = "frozen" if n < 4 else "batch"
        assert record["same_as"] == twin and record["seconds"] == 0
        original = cells[(twin, n, *rest)]
        assert record["robust_accuracy"] == original["robust_accuracy"] and original["seconds"] > 0


def test_cells_run_cheapest_first_and_twins_follow_the_cell_they_copy(model_and_card: tuple) -> None:
    _, card = model_and_card  # adaptive:4 on RobustNorm
    cells = robust_cells(card, GRIDS["core"])
    ordered = in_cost_order(cells, robust=True, subset=2000)
    assert sorted(cell.key for cell in ordered) == sorted(cell.key for cell in cells)
    reuses = [cell.per_image(robust=True) for cell in ordered]
    assert reuses == sorted(reuses, reverse=True) and reuses[0]  # per-image attacks, forwards only: first
    costs = [attack_images(cell, robust=True, subset=2000) for cell in ordered]
    rest = costs[reuses.index(False):]
    assert rest == sorted(rest) and rest[0] <= 2000 and rest[-1] == 2000 * 128  # lone at n = 128 last
    position = {cell.key: i for i, cell in enumerate(ordered)}
    for cell in ordered:
        policy, n, *rest = cell.key
        twin = ("batch", n, *rest)
        if policy == card.policy and n >= 4 and twin in position:  # adaptive:4 runs batch statistics from n = 4
            assert position[twin] < position[cell.key]


def test_fractions_get_every_gradient_and_poisoning_only_the_adaptive_one(model_and_card: tuple) -> None:
    _, card = model_and_card
    cells = robust_cells(card, GRIDS["core"])
    extra = {(str(cell.threat), cell.gradient) for cell in cells if cell.n == 32 and cell.eps_255 == 8
             and cell.threat.kind in ("fraction", "poison")}
    assert extra == {(fraction, gradient) for fraction in ("fraction:0.1", "fraction:0.5")
                     for gradient in ("adaptive", "margin", "transfer")} | {("poison:3", "adaptive")}
    assert len(cells) == len(set(cells))


def test_whole_batches_are_attacked_on_the_margin_too_and_impossible_cells_are_refused(model_and_card: tuple) -> None:
    _, card = model_and_card
    grid = GRIDS["core"]
    cells = robust_cells(card, grid)
    margin = {(str(c.policy), c.n, str(c.threat), c.eps_255) for c in cells if c.gradient == "margin"}
    deployed = [str(policy) for policy in policies(card)]
    assert margin == ({(policy, n, "whole", eps) for policy in deployed for n in grid.robust_sizes
                       for eps in grid.robust_eps_255}
                      | {(policy, 128, "whole", eps) for policy in deployed for eps in (1, 2, 4, 8)}
                      | {(policy, 32, threat, 8) for policy in deployed for threat in ("fraction:0.1", "fraction:0.5")})
    # Under frozen statistics the margin attack is per image, but never the cross-entropy attack's twin.
    adaptive = Cell.parse("frozen", 8, "whole", "pgd", 2, "adaptive")
    assert not same_computation(adaptive, Cell.parse("frozen", 8, "whole", "pgd", 2, "margin"), robust=True)
    assert same_computation(adaptive, Cell.parse("frozen", 8, "whole", "pgd", 2, "transfer"), robust=True)
    for threat, attack, gradient in (("lone", "fgsm", "unknown"), ("poison:1", "pgd", "transfer"),
                                     ("whole", "pgd", "unknown"), ("whole", "cw", "adaptive"),
                                     ("whole", "pgd", "sideways")):
        with pytest.raises(ValueError):
            Cell.parse("batch", 4, threat, attack, 2, gradient)


def test_threat_models_parse_once_into_their_canonical_strings() -> None:
    for text, canonical in (("whole", "whole"), ("Lone", "lone"), ("fraction:0.50", "fraction:0.5"),
                            ("fraction:1", "fraction:1"), ("poison:3", "poison:3")):
        assert str(parse_threat(text)) == canonical and parse_threat(canonical) == parse_threat(text)
    for bad in ("all", "whole:1", "fraction:0", "fraction:1.5", "fraction:x", "poison:0", "poison:1.5"):
        with pytest.raises(ValueError, match="threat model"):
            parse_threat(bad)
    assert [parse_threat("fraction:0.1").attackers_per_batch(n) for n in (1, 8, 32)] == [1, 1, 3]
    with pytest.raises(ValueError, match="larger than 3"):
        parse_threat("poison:3").attackers_per_batch(3)
    record = {"policy": "blend:512", "n": 32, "threat": "fraction:0.1", "attack": "pgd", "eps_255": 8.0,
              "gradient": "margin"}
    assert Cell.from_record(record).key == tuple(record.values())


def test_the_eps_sweep_runs_under_every_policy_pgd_with_both_gradients(model_and_card: tuple) -> None:
    _, card = model_and_card
    grid = GRIDS["core"]
    sweep = {(str(c.policy), c.attack, c.eps_255, c.gradient) for c in robust_cells(card, grid)
             if c.n == grid.sweep_size and c.threat.kind == "whole"}
    for policy in map(str, policies(card)):
        for eps in grid.sweep_eps_255:
            assert {(policy, "pgd", eps, "adaptive"), (policy, "pgd", eps, "transfer"),
                    (policy, "fgsm", eps, "adaptive")} <= sweep
    assert not any(attack == "fgsm" and gradient != "adaptive" for _, attack, _, gradient in sweep)


def test_resume_refuses_results_of_another_run_and_json_has_no_nan(tmp_path: object) -> None:
    import json

    from robustnorm.evaluation.store import RESULTS_FORMAT, resumable, without_nan

    report = {"format": RESULTS_FORMAT, "dataset": "d", "grid": "core", "grid_spec": {"steps": 20}, "seed": 0,
              "robust_images": 2000, "test_images": 10000, "models": [{"model": "a"}]}
    path = tmp_path / "robustness.json"
    assert resumable(path, report) is None
    path.write_text(json.dumps(report))
    assert resumable(path, report)["models"] == [{"model": "a"}]
    for other, why in ((dict(report, format=1), "another format"),  # lone attackers scored one per subset batch
                       (dict(report, grid_spec={"steps": 10}), "another grid"),
                       (dict(report, grid_spec={"steps": 20, "margin_threats": ["whole"]}), "another grid"),
                       (dict(report, test_images=200), "other data")):
        path.write_text(json.dumps(other))
        with pytest.raises(ValueError, match=why):
            resumable(path, report)
    assert without_nan({"a": [float("nan"), 1.0], "b": (float("nan"),)}) == {"a": [None, 1.0], "b": [None]}


def test_a_new_drift_calibration_keeps_the_accuracy_cells_and_reruns_only_drift() -> None:
    from dataclasses import replace

    from robustnorm.drift import DriftCalibration
    from robustnorm.evaluation.store import calibration_digest, card_digest

    calibration = DriftCalibration(batch_sizes=[1, 2], log_kl_mean=[0.0, 0.0], log_kl_std=[1.0, 1.0],
                                   image_layers=["bn1"], image_feature_mean=[0.0], image_feature_std=[1.0],
                                   image_threshold=1.0)
    card = ModelCard(name="m", architecture="resnet20", norm="bn", labels=list(CIFAR10_CLASSES), policy="blend:512",
                     calibration=calibration,
                     weights_sha256="ab" * 32)
    recalibrated = replace(card, calibration=replace(calibration, image_threshold=2.0))
    assert card_digest(recalibrated) == card_digest(card)  # accuracy cells do not read the calibration
    assert calibration_digest(recalibrated) != calibration_digest(card)
    assert card_digest(replace(card, policy="batch")) != card_digest(card)
    assert card_digest(replace(card, weights_sha256="cd" * 32)) != card_digest(card)


def test_the_unknown_batchmates_attacker_guesses_from_images_never_put_in_its_batch(
        model_and_card: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    model, card = model_and_card
    x, y = images(6)
    pool, pool_labels = torch.rand(30, 3, 32, 32), torch.randint(0, 10, (30,))
    seen: dict[str, torch.Tensor] = {}
    real_assemble, real_sampler = crafting.assemble_batches, crafting.unknown_batchmates_sampler

    def assemble(x01, labels, batchmates, *args, **kwargs):
        seen["batchmates"] = batchmates
        return real_assemble(x01, labels, batchmates, *args, **kwargs)

    def sampler(model, card, policy, n, eot_pool, groups):
        seen["eot"] = eot_pool
        return real_sampler(model, card, policy, n, eot_pool, groups)

    monkeypatch.setattr(running, "assemble_batches", assemble)
    monkeypatch.setattr(crafting, "unknown_batchmates_sampler", sampler)
    cell = Cell.parse("batch", 4, "lone", "pgd", 4, "unknown")
    record = run_cell(model, card, x, y, cell, steps=1, pool=pool, pool_labels=pool_labels)
    assert record.scored_images == 6

    def rows(batch: torch.Tensor) -> set[tuple]:
        return {tuple(image.flatten().tolist()) for image in batch}

    assert rows(seen["batchmates"]).isdisjoint(rows(seen["eot"]))
    assert rows(seen["batchmates"]) | rows(seen["eot"]) == rows(pool)
    # Under frozen statistics no guess is made, and the batchmates come from the whole pool as before.
    frozen = Cell.parse("frozen", 4, "lone", "pgd", 4, "unknown")
    assert split_pool(frozen, True, pool, pool_labels)[0] is pool


def test_merging_results_adds_missing_cells_and_never_replaces_a_figure() -> None:
    from robustnorm.evaluation.store import merge_results

    def cell(policy: str, accuracy: float, seconds: float = 1.0) -> dict:
        return {"policy": policy, "n": 8, "threat": "whole", "attack": "pgd", "eps_255": 8.0, "gradient": "margin",
                "robust_accuracy": accuracy, "seconds": seconds}

    def results(*cells: dict, digest: str = "d1") -> dict:
        return {"format": 2, "dataset": "d", "grid": "core", "seed": 0, "robust_images": 20, "test_images": 40,
                "grid_spec": {"steps": 20}, "device": "cpu",
                "models": [{"model": "m", "card_digest": digest, "seconds": 5.0, "robust": list(cells)}]}

    into = results(cell("frozen", 0.1))
    assert merge_results(into, dict(results(cell("frozen", 0.1, seconds=9.0), cell("batch", 0.2)),
                                     device="cuda")) == 1
    assert [c["policy"] for c in into["models"][0]["robust"]] == ["frozen", "batch"]
    assert into["models"][0]["seconds"] == 6.0 and into["device"] == "cpu + cuda"
    for other in (results(cell("frozen", 0.3)), results(cell("frozen", 0.1), digest="d2"),
                  {**results(), "seed": 1}, {**results(), "grid_spec": {"steps": 10}}):
        with pytest.raises(ValueError, match="--merge"):
            merge_results(into, other)
    assert len(into["models"][0]["robust"]) == 2
