"""ONNX export with the adaptive statistics in the graph (``robustnorm export``).

A plain ONNX export of an eval-mode model freezes BatchNorm into constants, which is exactly what this project
exists to avoid. Here every :class:`~robustnorm.RobustNorm2d` and :class:`~robustnorm.AdaptiveBatchNorm2d` is
exported as real graph operations over the batch, and one graph serves every statistics policy:

- inputs: ``images`` (N, C, H, W) float32 with a dynamic batch axis (normalised by the card's mean/std; the
  whole input is one statistics group, padding is the caller's concern); the scalars ``batch_weight`` and
  ``stream_weight``, and per layer ``<layer>.stream_mean`` and ``<layer>.stream_spread`` (C,). A layer normalises
  with ``(1 - wb - ws) * population + ws * stream + wb * batch``: the weights are a :class:`~robustnorm.GroupPlan`
  (:meth:`robustnorm.Policy.plan` decides them, as for the PyTorch layers), fed with :func:`plan_feeds`. Every
  one of these inputs is also an initializer holding ``frozen`` (weights 0, population statistics), so a caller
  that feeds only ``images`` runs the population statistics;
- each norm layer computes, in float32, its batch statistics with the layer's own
  :meth:`~robustnorm.layers._PolicyNorm.batch_statistics` and normalises with its ``scale_shift``;
- outputs: ``logits`` (N, classes) and per layer ``<layer>.mean`` and ``<layer>.spread`` (C,), the batch
  statistics the drift report needs, and ``<layer>.image_rows`` (N, R, C), each image's own statistics (what a
  stream keeps, :mod:`robustnorm.stream`, and what the per-image drift score reads).

The card travels beside the file (``model.onnx`` -> ``model.card.json``). The ONNX metadata (``robustnorm.*``)
records the layer names, the norm kind, the default policy and the population statistics, so a server needs
only the file and its card (:meth:`ExportedModel.from_metadata`). With ONNX Runtime's IO binding, bind the
inputs that are also initializers as ``OrtValue`` s (``bind_ortvalue_input``).

The export uses PyTorch's TorchScript-based exporter (``dynamo=False``), which needs no package beyond
``onnx``; the graph is traced in float32 on the CPU from a copy of the model, which is left untouched.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .io import DEFAULT_MODEL, ModelCard, load_external, load_model
from .layers import _PolicyNorm, policy_layers
from .policy import GroupPlan, Policy, parse_policy

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
IMAGES = "images"
BATCH_WEIGHT = "batch_weight"
STREAM_WEIGHT = "stream_weight"
LOGITS = "logits"
MEAN_SUFFIX, SPREAD_SUFFIX, IMAGE_ROWS_SUFFIX = ".mean", ".spread", ".image_rows"
STREAM_MEAN_SUFFIX, STREAM_SPREAD_SUFFIX = ".stream_mean", ".stream_spread"
CARD_SUFFIX = ".card.json"
METADATA_PREFIX = "robustnorm."
# The folded graphs beside an export: frozen statistics folded into the convolutions, recording the image-score
# layers ("frozen") or every layer's rows for the streams ("frozen-rows"); see export_folded_onnx.
FOLDED_KINDS = ("frozen", "frozen-rows")


def card_path_for(onnx_path: str | Path) -> Path:
    """Where the card of an exported model lives: ``model.onnx`` -> ``model.card.json``."""
    path = Path(onnx_path)
    return path.with_name(path.stem + CARD_SUFFIX)


def folded_path_for(onnx_path: str | Path, kind: str) -> Path:
    """Where a folded graph of an export lives: ``model.onnx`` -> ``model.frozen.onnx``, ``model.frozen-rows.onnx``."""
    if kind not in FOLDED_KINDS:
        raise ValueError(f"unknown folded graph {kind!r}: use one of {', '.join(FOLDED_KINDS)}")
    path = Path(onnx_path)
    return path.with_name(f"{path.stem}.{kind}.onnx")


def plan_feeds(plan: GroupPlan, stream: Mapping[str, tuple[Tensor | np.ndarray, Tensor | np.ndarray]] | None = None
               ) -> dict[str, np.ndarray]:
    """The inputs that make an exported graph run ``plan``: the two weights and, for a stream plan, the
    stream's ``layer -> (mean, spread)`` (tensors, or float32 arrays such as
    :meth:`robustnorm.Stream.statistics_arrays`; layers left out keep their initializers, the population)."""
    feeds = {BATCH_WEIGHT: np.array(plan.batch_weight, dtype=np.float32),
             STREAM_WEIGHT: np.array(plan.stream_weight, dtype=np.float32)}
    if stream and plan.stream_weight:
        for name, (mean, spread) in stream.items():
            feeds[name + STREAM_MEAN_SUFFIX] = _float32_array(mean)
            feeds[name + STREAM_SPREAD_SUFFIX] = _float32_array(spread)
    return feeds


def _float32_array(values: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values if values.dtype == np.float32 else values.astype(np.float32)
    return values.detach().cpu().float().numpy()


def graph_input_names(layers: Sequence[str]) -> list[str]:
    """The inputs of an exported graph, in order."""
    names = [IMAGES, BATCH_WEIGHT, STREAM_WEIGHT]
    for name in layers:
        names += [name + STREAM_MEAN_SUFFIX, name + STREAM_SPREAD_SUFFIX]
    return names


def graph_output_names(layers: Sequence[str]) -> list[str]:
    """The outputs of an exported graph, in order."""
    names = [LOGITS]
    for name in layers:
        names += [name + MEAN_SUFFIX, name + SPREAD_SUFFIX, name + IMAGE_ROWS_SUFFIX]
    return names


@dataclass
class ExportedModel:
    """What :func:`export_onnx` wrote and how to read the graph's outputs (all of it is in the metadata)."""

    onnx_path: Path
    card_path: Path
    policy: str  # the default policy (the policy inputs' initializers)
    robust: bool  # RobustNorm layers (spread = range, adaptive falls back to frozen) or BatchNorm layers
    layers: list[str]  # norm layers in the model's module order
    opset: int
    # layer -> (population mean, population spread): the running statistics drift is measured against
    population: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict, repr=False)

    @property
    def output_names(self) -> list[str]:
        return graph_output_names(self.layers)

    def metadata(self) -> dict[str, str]:
        """The ``robustnorm.*`` metadata entries that describe the graph (keys without the prefix)."""
        return {"policy": self.policy, "robust": "true" if self.robust else "false",
                "layers": json.dumps(self.layers), "opset": str(self.opset), "population": json.dumps(self.population)}

    @classmethod
    def from_metadata(cls, onnx_path: str | Path, metadata: dict[str, str]) -> ExportedModel:
        """Rebuild the description from the model's metadata map, e.g. ONNX Runtime's
        ``session.get_modelmeta().custom_metadata_map`` (so serving needs no ``onnx`` package)."""
        meta = {key[len(METADATA_PREFIX):]: value for key, value in metadata.items()
                if key.startswith(METADATA_PREFIX)}
        if "layers" not in meta or "population" not in meta or "image_layers" in meta:
            raise ValueError(f"{onnx_path} was not written by this version of robustnorm export (its robustnorm.* "
                             "metadata is missing or older); export it again with `robustnorm export`")
        population = {name: (list(values[0]), list(values[1]))
                      for name, values in json.loads(meta["population"]).items()}
        return cls(onnx_path=Path(onnx_path), card_path=card_path_for(onnx_path), policy=meta["policy"],
                   robust=meta["robust"] == "true", layers=json.loads(meta["layers"]), opset=int(meta["opset"]),
                   population=population)

    @classmethod
    def read(cls, onnx_path: str | Path) -> ExportedModel:
        """Read the description back from an exported file (needs the ``onnx`` package)."""
        import onnx

        proto = onnx.load(str(onnx_path), load_external_data=False)
        return cls.from_metadata(onnx_path, {prop.key: prop.value for prop in proto.metadata_props})


class _Switch:
    """State shared by the traced norm layers of one forward: the weights and stream in, the statistics out."""

    def __init__(self) -> None:
        self.weights: tuple[Tensor, Tensor, Tensor] | None = None  # batch, stream, population
        self.stream: dict[str, tuple[Tensor, Tensor]] = {}
        self.outputs: dict[str, Tensor] = {}


class _GraphNorm(nn.Module):
    """A policy norm layer over the whole batch as one group, for tracing only: the layer's own public
    statistics (``batch_statistics``, ``population``, ``scale_shift``), mixed as the library mixes them."""

    def __init__(self, layer: _PolicyNorm, name: str, switch: _Switch) -> None:
        super().__init__()
        self.layer = layer
        self.name = name
        self.switch = switch
        self.register_buffer("zeros", torch.zeros(layer.num_features), persistent=False)
        self.register_buffer("ones", torch.ones(layer.num_features), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        layer, weights = self.layer, self.switch.weights
        assert weights is not None, "the export graph sets the weights before the model runs"
        if self.name + MEAN_SUFFIX in self.switch.outputs:
            raise ValueError(f"norm layer {self.name!r} runs more than once per forward; such models cannot "
                             "be exported with one set of statistics per layer")
        stats = layer.batch_statistics(x.float())
        mean, spread = stats.mean[0], stats.spread[0]
        assert stats.image_rows is not None
        self.switch.outputs.update({self.name + MEAN_SUFFIX: mean, self.name + SPREAD_SUFFIX: spread,
                                    self.name + IMAGE_ROWS_SUFFIX: stats.image_rows})
        batch_weight, stream_weight, population_weight = weights
        stream_mean, stream_spread = self.switch.stream[self.name]
        population_mean, population_spread = layer.population(torch.float32)
        used_mean = population_weight * population_mean + stream_weight * stream_mean + batch_weight * mean
        used_spread = population_weight * population_spread + stream_weight * stream_spread + batch_weight * spread
        # one BatchNormalization node (mean 0, variance 1: constants of the graph): one pass over x
        scale, shift = layer.scale_shift(used_mean, used_spread)
        return F.batch_norm(x, self.zeros, self.ones, scale, shift, False, 0.0, 0.0)


class _ExportGraph(nn.Module):
    """A copy of the model whose norm layers are :class:`_GraphNorm`; returns logits and statistics."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).cpu().float().eval()
        self.switch = _Switch()
        self.layer_names: list[str] = []
        for name, layer in policy_layers(self.model):
            if not name:
                raise ValueError("export a model that contains norm layers, not a bare norm layer")
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, _GraphNorm(layer, name, self.switch))
            self.layer_names.append(name)

    def forward(self, images: Tensor, batch_weight: Tensor, stream_weight: Tensor, *stream: Tensor
                ) -> tuple[Tensor, ...]:
        # the population's weight once for every layer
        self.switch.weights, self.switch.outputs = (batch_weight, stream_weight, 1 - batch_weight - stream_weight), {}
        self.switch.stream = {name: (stream[2 * i], stream[2 * i + 1]) for i, name in enumerate(self.layer_names)}
        logits = self.model(images)
        missing = [name for name in self.layer_names if name + MEAN_SUFFIX not in self.switch.outputs]
        if missing:
            raise ValueError(f"norm layers {missing[:5]} never ran in the forward; remove them before exporting")
        return (logits, *(self.switch.outputs[name] for name in graph_output_names(self.layer_names)[1:]))


def _model_robust(model: nn.Module) -> bool:
    kinds = {layer.robust for _, layer in policy_layers(model)}
    if len(kinds) > 1:
        raise ValueError("the model mixes RobustNorm2d and AdaptiveBatchNorm2d layers; export supports one "
                         "kind per model (their adaptive fallbacks differ)")
    return kinds == {True}


def export_onnx(model: nn.Module, card: ModelCard, path: str | Path, policy: str | Policy | None = None, *,
                opset: int = DEFAULT_OPSET, check: bool = True, folded: bool = True) -> ExportedModel:
    """Export ``model`` to ONNX at ``path`` with its statistics in the graph; write the card beside it.

    ``policy`` is the default recorded in the card and metadata (the card's policy when omitted); a caller runs
    any policy by feeding :func:`plan_feeds` for each group's plan. With ``check`` the file is validated with
    ``onnx.checker`` (full check, with shape inference). With ``folded`` (and a model that can be folded), the two
    folded graphs of :func:`export_folded_onnx` are written beside it too. Returns what was written.
    """
    import onnx
    from onnx import numpy_helper

    if opset < DEFAULT_OPSET:
        raise ValueError(f"export needs opset {DEFAULT_OPSET} or newer, got {opset}")
    default = parse_policy(policy if policy is not None else card.policy)
    robust = _model_robust(model)
    layers = policy_layers(model)
    names = [name for name, _ in layers]
    graph = _ExportGraph(model)
    population = {name: tuple(t.detach().cpu().float() for t in layer.population(torch.float32))
                  for name, layer in layers}
    initial = {BATCH_WEIGHT: torch.tensor(0.0), STREAM_WEIGHT: torch.tensor(0.0)}
    for name in names:
        initial[name + STREAM_MEAN_SUFFIX], initial[name + STREAM_SPREAD_SUFFIX] = population[name]
    input_names = graph_input_names(names)
    example = (torch.zeros(2, *card.input_size), *(initial[name] for name in input_names[1:]))
    output_names = graph_output_names(names)
    dynamic_axes = {IMAGES: {0: "batch"}, LOGITS: {0: "batch"}}
    dynamic_axes.update({name: {0: "batch"} for name in output_names if name.endswith(IMAGE_ROWS_SUFFIX)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice
        torch.onnx.export(graph, example, str(path), dynamo=False, opset_version=opset, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    card_path = card_path_for(path)
    exported = ExportedModel(onnx_path=path, card_path=card_path, policy=str(default), robust=robust, layers=names,
                             opset=opset, population={name: (m.tolist(), s.tolist())
                                                      for name, (m, s) in population.items()})
    proto = onnx.load(str(path))
    # The inputs other than the images double as initializers holding frozen statistics; feeding overrides them.
    proto.graph.initializer.extend(numpy_helper.from_array(initial[name].numpy(), name) for name in input_names[1:])
    card_dict = {**card.to_dict(), "policy": str(default)}
    if card_dict.get("calibration") and "policy" not in card_dict["calibration"]:
        # The drift calibration was made under the card's policy: say so, now that the card names another.
        card_dict["calibration"]["policy"] = card.policy
    metadata = {**exported.metadata(), "model": card.name, "version": card.version, "card": json.dumps(card_dict)}
    for key, value in metadata.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_PREFIX + key, value=value))
    proto.doc_string = (f"robustnorm export of {card.name} ({card.version}); default policy {default}; feed "
                        f"{BATCH_WEIGHT}, {STREAM_WEIGHT} and the stream statistics (robustnorm.export.plan_feeds) "
                        "to run a policy's plan")
    proto.producer_name = "robustnorm"
    if check:
        onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    card_path.write_text(json.dumps(card_dict, indent=2) + "\n")
    logger.info("exported %s (%d norm layers, default policy %s, opset %d) to %s", card.name, len(names), default,
                opset, path)
    if folded and names:
        try:
            export_folded_onnx(model, card, path, opset=opset, check=check)
        except ValueError as error:  # e.g. a norm layer after something other than a convolution
            logger.info("no folded graphs written for %s: %s", card.name, error)
        except Exception as error:  # the folded graphs only speed frozen batches up: the export stands without them
            logger.warning("no folded graphs written for %s: %r", card.name, error)
    return exported


def export_folded_onnx(model: nn.Module, card: ModelCard, onnx_path: str | Path, *, opset: int = DEFAULT_OPSET,
                       check: bool = True) -> dict[str, Path]:
    """Write the folded graphs beside the export at ``onnx_path`` (:func:`folded_path_for`); kind -> path.

    Each takes ``images`` alone and runs the frozen statistics folded into the convolutions
    (:mod:`robustnorm.fold`); its outputs are the logits and, per recorded layer, the outputs the full graph
    has for it (``<layer>.mean``, ``<layer>.spread``, ``<layer>.image_rows``), recovered from the folded
    outputs. ``frozen`` records the card's image-score layers (none without a drift calibration), for frozen
    batches whose per-layer drift is not scored; ``frozen-rows`` records every layer, for ``auto`` while its
    gate holds the population (its streams keep every layer's rows). Raises ``ValueError`` for a model that
    cannot be folded. The metadata (``robustnorm.layers``) names the recorded layers.
    """
    import onnx

    from .fold import FoldedGraph, fold_frozen

    folded_model = fold_frozen(copy.deepcopy(model).cpu().float().eval())
    image_layers = list(card.calibration.image_layers) if card.calibration is not None else []
    written = {}
    for kind, layers in (("frozen", image_layers), ("frozen-rows", folded_model.layer_names)):
        graph = FoldedGraph(folded_model, layers)
        output_names = graph_output_names(graph.layers)
        dynamic_axes = {IMAGES: {0: "batch"}, LOGITS: {0: "batch"}}
        dynamic_axes.update({name: {0: "batch"} for name in output_names if name.endswith(IMAGE_ROWS_SUFFIX)})
        path = folded_path_for(onnx_path, kind)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(graph, (torch.zeros(2, *card.input_size),), str(path), dynamo=False,
                              opset_version=opset, input_names=[IMAGES], output_names=output_names,
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        proto = onnx.load(str(path))
        for key, value in {"layers": json.dumps(graph.layers), "folded": kind, "model": card.name,
                           "version": card.version}.items():
            proto.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_PREFIX + key, value=value))
        proto.producer_name = "robustnorm"
        if check:
            onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(path))
        written[kind] = path
    return written


# -- command line ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``export`` options on ``parser``."""
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"bundled model name or model directory (default {DEFAULT_MODEL})")
    parser.add_argument("-o", "--output", type=Path, help="the .onnx file to write (default ./NAME.onnx); "
                        "the card is written beside it as NAME.card.json")
    parser.add_argument("--policy", help="default statistics policy recorded with the graph (default: the "
                        "card's); callers run any policy by feeding its plan's weights")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (>= {DEFAULT_OPSET})")
    parser.add_argument("--factory", help="export 'module:factory' (any PyTorch model with BatchNorm layers) "
                        "instead of MODEL; needs --weights and --card")
    parser.add_argument("--weights", type=Path, help="safetensors weights for --factory")
    parser.add_argument("--card", type=Path, help="card JSON for --factory")
    parser.add_argument("--verify", action="store_true",
                        help="after exporting, compare ONNX Runtime (CPU) with PyTorch on random batches")
    parser.add_argument("--verify-sizes", default="1,2,15,16,64", help="batch sizes for --verify")


def verify_export(model: nn.Module, exported: ExportedModel, policies: Sequence[str], sizes: Sequence[int],
                  input_size: Sequence[int], seed: int = 0) -> dict[str, dict[int, float]]:
    """Largest absolute logit difference between ONNX Runtime (CPU) and PyTorch, per policy and batch size
    (one group of each size; stream policies with an empty stream)."""
    import onnxruntime as ort

    from .grouping import batch_groups

    options = ort.SessionOptions()
    options.log_severity_level = 3  # not the note that the inputs are overridable initializers
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # leave the cores to PyTorch
    session = ort.InferenceSession(str(exported.onnx_path), options, providers=["CPUExecutionProvider"])
    reference = copy.deepcopy(model).cpu().float().eval()
    generator = torch.Generator().manual_seed(seed)
    differences: dict[str, dict[int, float]] = {}
    for text in policies:
        policy = parse_policy(text)
        differences[text] = {}
        for n in sizes:
            images = torch.randn(n, *input_size, generator=generator)
            with torch.no_grad(), batch_groups(reference, [n], policy=policy):
                expected = reference(images).numpy()
            (plan,) = policy.plan([n], exported.robust)
            (logits,) = session.run([LOGITS], {IMAGES: images.numpy(), **plan_feeds(plan)})
            differences[text][n] = float(np.abs(logits - expected).max())
    return differences


def run(args: argparse.Namespace) -> int:
    """``robustnorm export``: write the ONNX graph and its card, print where they went (and the check)."""
    import onnx

    if args.factory:
        if args.weights is None or args.card is None:
            raise SystemExit("--factory needs --weights (safetensors) and --card (JSON)")
        model, card = load_external(args.factory, args.weights, args.card)
    else:
        model, card = load_model(args.model)
    output = args.output if args.output is not None else Path(f"{card.name}.onnx")
    exported = export_onnx(model, card, output, policy=args.policy, opset=args.opset)
    summary: dict[str, object] = {
        "onnx": str(exported.onnx_path), "card": str(exported.card_path), "policy": exported.policy,
        "opset": exported.opset, "norm_layers": len(exported.layers), "outputs": len(exported.output_names),
        "nodes": len(onnx.load(str(exported.onnx_path), load_external_data=False).graph.node),
        "folded": {kind: str(folded_path_for(exported.onnx_path, kind)) for kind in FOLDED_KINDS
                   if folded_path_for(exported.onnx_path, kind).is_file()},
    }
    status = 0
    if args.verify:
        sizes = [int(size) for size in args.verify_sizes.split(",") if size.strip()]
        policies = sorted({exported.policy, "frozen", "batch"})
        differences = verify_export(model, exported, policies, sizes, card.input_size)
        worst = max(value for per_size in differences.values() for value in per_size.values())
        summary["verify"] = {"max_abs_logit_difference": differences, "worst": worst, "tolerance": 1e-4}
        status = 0 if worst < 1e-4 else 1
    print(json.dumps(summary, indent=2))
    return status
