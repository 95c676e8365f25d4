"""ONNX export with the adaptive statistics in the graph (``robustnorm export``).

A plain ONNX export of an eval-mode model freezes BatchNorm into constants, which is exactly what this project
exists to avoid. Here every :class:`~robustnorm.RobustNorm2d` and :class:`~robustnorm.AdaptiveBatchNorm2d` is
exported as real graph operations over the batch, and one graph serves every statistics policy:

- inputs: ``images`` (N, C, H, W) float32 with a dynamic batch axis (already normalised by the card's
  mean/std, exactly what the PyTorch model takes; the whole batch is one group, padding is the caller's
  concern), and two int64/float32 scalars that encode the policy, ``min_batch`` and ``fallback_n0``. Both are
  also initializers holding the default policy (the card's, or ``policy=``), so a caller that does not feed them
  gets that policy, and a caller that feeds them switches policy per run without another session
  (:func:`policy_feeds` turns a policy string into the two values);
- the weight of the batch statistics is computed in the graph from the batch size ``n = Shape(images)[0]``:
  ``w = Where(n >= min_batch, 1, Where(fallback_n0 > 0, n / (fallback_n0 + n), 0))``, so ``frozen`` is
  ``w = 0``, ``batch`` is ``w = 1``, ``blend:N0`` is ``n / (N0 + n)`` and ``adaptive`` is the ``Where`` on ``n``;
- each norm layer computes, in float32, the batch mean (ReduceMean over N, H, W) and the spread (biased
  variance, or the range ``ReduceMax - ReduceMin`` for RobustNorm), mixes them with the population statistics
  as ``(1 - w) * population + w * batch`` and normalises with ``x * scale + shift``, as the library does;
- outputs: ``logits`` (N, classes), ``batch_weight`` (the ``w`` that ran, a scalar), and per layer
  ``<layer>.mean`` and ``<layer>.spread`` of shape (C,), the batch statistics the drift metrics need whatever
  the policy, plus ``<layer>.image_mean`` and ``<layer>.image_spread`` (N, C), each image's own statistics, for
  the layers of the per-image drift score (the card calibration's ``image_layers``, else the first three norm
  layers).

The card travels beside the file (``model.onnx`` -> ``model.card.json``, readable with
:func:`robustnorm.read_card`) with the default policy of the graph. The ONNX metadata (``robustnorm.*``) records
the layer names, the norm kind, the default policy and the population statistics the drift is measured
against, so a server needs only the file and its card (:meth:`ExportedModel.from_metadata`). With ONNX
Runtime's IO binding, bind the policy inputs as ``OrtValue`` s (``bind_ortvalue_input``): being initializers
too, they are not among the inputs ``bind_cpu_input`` looks names up in.

The export uses PyTorch's TorchScript-based exporter (``dynamo=False``), which needs no package beyond
``onnx``; the graph is traced in float32 on the CPU from a copy of the model, which is left untouched.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .drift import IMAGE_SCORE_LAYERS
from .io import DEFAULT_MODEL, ModelCard, load_external, load_model
from .layers import _PolicyNorm, policy_layers
from .policy import Policy, parse_policy

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
IMAGES = "images"
MIN_BATCH = "min_batch"
FALLBACK_N0 = "fallback_n0"
LOGITS = "logits"
BATCH_WEIGHT = "batch_weight"
MEAN_SUFFIX, SPREAD_SUFFIX, IMAGE_MEAN_SUFFIX, IMAGE_SPREAD_SUFFIX = ".mean", ".spread", ".image_mean", ".image_spread"
CARD_SUFFIX = ".card.json"
# ``min_batch`` for policies that never use the batch statistics alone (frozen, blend): no batch is this large.
NEVER = int(np.iinfo(np.int64).max)
METADATA_PREFIX = "robustnorm."


def card_path_for(onnx_path: str | Path) -> Path:
    """Where the card of an exported model lives: ``model.onnx`` -> ``model.card.json``."""
    path = Path(onnx_path)
    return path.with_name(path.stem + CARD_SUFFIX)


def policy_feeds(policy: str | Policy, robust: bool) -> dict[str, np.ndarray]:
    """The ``min_batch`` and ``fallback_n0`` inputs that make an exported graph run ``policy``.

    ``robust`` says whether the model's norm layers are RobustNorm layers, which decides the default fallback
    of ``adaptive:MIN`` (the library's :meth:`Policy.resolve` decides it; ``fallback_n0 = 0`` means frozen).
    """
    parsed = parse_policy(policy)
    if parsed.kind == "adaptive":
        assert parsed.min_batch is not None
        min_batch, fallback = parsed.min_batch, parsed.resolve(0, robust)  # n = 0 is below any MIN_BATCH
    else:
        min_batch, fallback = (1 if parsed.kind == "batch" else NEVER), parsed
    n0 = float(fallback.n0) if fallback.kind == "blend" and fallback.n0 is not None else 0.0
    return {MIN_BATCH: np.array(min_batch, dtype=np.int64), FALLBACK_N0: np.array(n0, dtype=np.float32)}


def graph_output_names(layers: Sequence[str], image_layers: Sequence[str]) -> list[str]:
    """The outputs of an exported graph, in order, for its norm layers and image-score layers."""
    names = [LOGITS, BATCH_WEIGHT]
    for name in layers:
        names += [name + MEAN_SUFFIX, name + SPREAD_SUFFIX]
        if name in image_layers:
            names += [name + IMAGE_MEAN_SUFFIX, name + IMAGE_SPREAD_SUFFIX]
    return names


@dataclass
class ExportedModel:
    """What :func:`export_onnx` wrote and how to read the graph's outputs (all of it is in the metadata)."""

    onnx_path: Path
    card_path: Path
    policy: str  # the default policy (the policy inputs' initializers)
    robust: bool  # RobustNorm layers (spread = range, adaptive falls back to frozen) or BatchNorm layers
    layers: list[str]  # norm layers in the model's module order
    image_layers: list[str]  # layers with <layer>.image_mean and <layer>.image_spread outputs
    opset: int
    # layer -> (population mean, population spread): the running statistics drift is measured against
    population: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict, repr=False)

    @property
    def output_names(self) -> list[str]:
        return graph_output_names(self.layers, self.image_layers)

    def metadata(self) -> dict[str, str]:
        """The ``robustnorm.*`` metadata entries that describe the graph (keys without the prefix)."""
        return {"policy": self.policy, "robust": "true" if self.robust else "false",
                "layers": json.dumps(self.layers), "image_layers": json.dumps(self.image_layers),
                "opset": str(self.opset), "population": json.dumps(self.population)}

    @classmethod
    def from_metadata(cls, onnx_path: str | Path, metadata: dict[str, str]) -> ExportedModel:
        """Rebuild the description from the model's metadata map, e.g. ONNX Runtime's
        ``session.get_modelmeta().custom_metadata_map`` (so serving needs no ``onnx`` package)."""
        meta = {key[len(METADATA_PREFIX):]: value for key, value in metadata.items()
                if key.startswith(METADATA_PREFIX)}
        if "layers" not in meta or "population" not in meta:
            raise ValueError(f"{onnx_path} was not written by robustnorm export (no robustnorm.* metadata); "
                             "export it with `robustnorm export`")
        population = {name: (list(values[0]), list(values[1]))
                      for name, values in json.loads(meta["population"]).items()}
        return cls(onnx_path=Path(onnx_path), card_path=card_path_for(onnx_path), policy=meta["policy"],
                   robust=meta["robust"] == "true", layers=json.loads(meta["layers"]),
                   image_layers=json.loads(meta["image_layers"]), opset=int(meta["opset"]), population=population)

    @classmethod
    def read(cls, onnx_path: str | Path) -> ExportedModel:
        """Read the description back from an exported file (needs the ``onnx`` package)."""
        import onnx

        proto = onnx.load(str(onnx_path), load_external_data=False)
        return cls.from_metadata(onnx_path, {prop.key: prop.value for prop in proto.metadata_props})


class _Switch:
    """State shared by the traced norm layers of one forward: the batch weight in, the statistics out."""

    def __init__(self) -> None:
        self.weight: Tensor | None = None
        self.outputs: dict[str, Tensor] = {}


class _GraphNorm(nn.Module):
    """A policy norm layer written as plain tensor operations over the whole batch, for tracing only.

    The mixing and the affine transform reuse the layer's own ``_population`` and ``_affine``, so the graph
    computes what :meth:`_PolicyNorm._normalize_groups` computes for a single group.
    """

    def __init__(self, layer: _PolicyNorm, name: str, switch: _Switch, image_mean: bool) -> None:
        super().__init__()
        self.layer = layer
        self.name = name
        self.switch = switch
        self.image_mean = image_mean

    def forward(self, x: Tensor) -> Tensor:
        layer, weight = self.layer, self.switch.weight
        assert weight is not None, "the export graph sets the batch weight before the model runs"
        if self.name + MEAN_SUFFIX in self.switch.outputs:
            raise ValueError(f"norm layer {self.name!r} runs more than once per forward; such models cannot "
                             "be exported with one set of statistics per layer")
        values = x.float()
        image_mean = values.mean(dim=(2, 3))
        mean = image_mean.mean(dim=0)
        # Per image first, then over the batch, as the layers' _spreads do: the per-image drift score's spreads
        # come out of the same reductions.
        if layer.robust:
            image_max, image_min = values.amax(dim=(2, 3)), values.amin(dim=(2, 3))
            spread = image_max.amax(dim=0) - image_min.amin(dim=0)
            image_spread = image_max - image_min
        else:
            deviation = (values - mean[None, :, None, None]).square().mean(dim=(2, 3))
            spread = deviation.mean(dim=0)
            image_spread = (deviation - (image_mean - mean).square()).clamp_min(0)
        self.switch.outputs[self.name + MEAN_SUFFIX] = mean
        self.switch.outputs[self.name + SPREAD_SUFFIX] = spread
        if self.image_mean:  # each image's own statistics, for the per-image drift score
            self.switch.outputs[self.name + IMAGE_MEAN_SUFFIX] = image_mean
            self.switch.outputs[self.name + IMAGE_SPREAD_SUFFIX] = image_spread
        population_mean, population_spread = layer._population(torch.float32)
        # (1 - w) * population + w * batch, the library's mixing; w is 0, 1 or n / (N0 + n) from the Where.
        used_mean = (1 - weight) * population_mean + weight * mean
        used_spread = (1 - weight) * population_spread + weight * spread
        scale, shift = layer._affine(used_mean, used_spread)
        return x * scale[None, :, None, None].to(x.dtype) + shift[None, :, None, None].to(x.dtype)


class _ExportGraph(nn.Module):
    """A copy of the model whose norm layers are :class:`_GraphNorm`; returns logits, weight and statistics."""

    def __init__(self, model: nn.Module, image_layers: Sequence[str]) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).cpu().float().eval()
        self.switch = _Switch()
        self.layer_names: list[str] = []
        for name, layer in policy_layers(self.model):
            if not name:
                raise ValueError("export a model that contains norm layers, not a bare norm layer")
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, _GraphNorm(layer, name, self.switch, image_mean=name in image_layers))
            self.layer_names.append(name)
        self.image_layers = [name for name in self.layer_names if name in image_layers]

    def output_names(self) -> list[str]:
        return graph_output_names(self.layer_names, self.image_layers)

    def forward(self, images: Tensor, min_batch: Tensor, fallback_n0: Tensor) -> tuple[Tensor, ...]:
        # The batch size as a tensor (Shape -> Gather), so that the graph reads it from every input.
        n_images = torch._shape_as_tensor(images)[0]
        n = n_images.to(torch.float32)
        zero, one = torch.zeros_like(n), torch.ones_like(n)
        fallback_weight = torch.where(fallback_n0 > 0, n / (fallback_n0 + n), zero)
        weight = torch.where(n_images >= min_batch, one, fallback_weight)
        self.switch.weight, self.switch.outputs = weight, {}
        logits = self.model(images)
        missing = [name for name in self.layer_names if name + MEAN_SUFFIX not in self.switch.outputs]
        if missing:
            raise ValueError(f"norm layers {missing[:5]} never ran in the forward; remove them before exporting")
        names = self.output_names()
        return (logits, weight, *(self.switch.outputs[name] for name in names[2:]))


def _model_robust(model: nn.Module) -> bool:
    kinds = {layer.robust for _, layer in policy_layers(model)}
    if len(kinds) > 1:
        raise ValueError("the model mixes RobustNorm2d and AdaptiveBatchNorm2d layers; export supports one "
                         "kind per model (their adaptive fallbacks differ)")
    return kinds == {True}


def _default_image_layers(model: nn.Module, card: ModelCard) -> list[str]:
    if card.calibration is not None and card.calibration.image_layers:
        return list(card.calibration.image_layers)
    return [name for name, _ in policy_layers(model)[:IMAGE_SCORE_LAYERS]]


def export_onnx(model: nn.Module, card: ModelCard, path: str | Path, policy: str | Policy | None = None, *,
                opset: int = DEFAULT_OPSET, image_layers: Sequence[str] | None = None,
                check: bool = True) -> ExportedModel:
    """Export ``model`` to ONNX at ``path`` with its statistics policies in the graph; write the card beside it.

    ``policy`` is the graph's default (the value of its ``min_batch`` and ``fallback_n0`` initializers; the
    card's policy when omitted); any other policy runs by feeding :func:`policy_feeds`. ``image_layers`` are
    the layers whose per-image means are outputs (default: the card calibration's, else the first three).
    With ``check`` the file is validated with ``onnx.checker`` (full check, with shape inference).
    Returns what was written, with the output names.
    """
    import onnx
    from onnx import numpy_helper

    if opset < DEFAULT_OPSET:
        raise ValueError(f"export needs opset {DEFAULT_OPSET} or newer, got {opset}")
    default = parse_policy(policy if policy is not None else card.policy)
    robust = _model_robust(model)
    names = [name for name, _ in policy_layers(model)]
    image_layers = list(image_layers) if image_layers is not None else _default_image_layers(model, card)
    unknown = sorted(set(image_layers) - set(names))
    if unknown:
        raise ValueError(f"image_layers {unknown} are not norm layers of the model; norm layers are {names[:8]}...")
    graph = _ExportGraph(model, image_layers)
    feeds = policy_feeds(default, robust)
    example = (torch.zeros(2, *card.input_size), torch.from_numpy(feeds[MIN_BATCH]),
               torch.from_numpy(feeds[FALLBACK_N0]))
    output_names = graph.output_names()
    dynamic_axes = {IMAGES: {0: "batch"}, LOGITS: {0: "batch"}}
    per_image = (IMAGE_MEAN_SUFFIX, IMAGE_SPREAD_SUFFIX)
    dynamic_axes.update({name: {0: "batch"} for name in output_names if name.endswith(per_image)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice
        torch.onnx.export(graph, example, str(path), dynamo=False, opset_version=opset,
                          input_names=[IMAGES, MIN_BATCH, FALLBACK_N0], output_names=output_names,
                          dynamic_axes=dynamic_axes, do_constant_folding=True)
    card_path = card_path_for(path)
    exported = ExportedModel(
        onnx_path=path, card_path=card_path, policy=str(default), robust=robust, layers=names,
        image_layers=graph.image_layers, opset=opset,
        population={name: tuple(t.detach().cpu().tolist() for t in layer._population(torch.float32))
                    for name, layer in policy_layers(model)})
    assert exported.output_names == output_names
    proto = onnx.load(str(path))
    # The policy inputs double as initializers: their values are the default policy, and feeding them overrides.
    proto.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in feeds.items())
    card_dict = {**card.to_dict(), "policy": str(default)}
    if card_dict.get("calibration") and "policy" not in card_dict["calibration"]:
        # The drift calibration was made under the card's policy: say so, now that the card names another.
        card_dict["calibration"]["policy"] = card.policy
    metadata = {**exported.metadata(), "model": card.name, "version": card.version, "card": json.dumps(card_dict)}
    for key, value in metadata.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_PREFIX + key, value=value))
    proto.doc_string = (f"robustnorm export of {card.name} ({card.version}); default policy {default}; feed "
                        f"{MIN_BATCH} and {FALLBACK_N0} (robustnorm.export.policy_feeds) to switch policy")
    proto.producer_name = "robustnorm"
    if check:
        onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    card_path.write_text(json.dumps(card_dict, indent=2) + "\n")
    logger.info("exported %s (%d norm layers, default policy %s, opset %d) to %s", card.name, len(names), default,
                opset, path)
    return exported


# -- command line ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``export`` options on ``parser``."""
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"bundled model name or model directory (default {DEFAULT_MODEL})")
    parser.add_argument("-o", "--output", type=Path, help="the .onnx file to write (default ./NAME.onnx); "
                        "the card is written beside it as NAME.card.json")
    parser.add_argument("--policy", help="default statistics policy of the graph (default: the card's); "
                        "callers switch policy at run time by feeding min_batch and fallback_n0")
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
    """Largest absolute logit difference between ONNX Runtime (CPU) and PyTorch, per policy and batch size."""
    import onnxruntime as ort

    from .grouping import batch_groups
    from .layers import set_policy

    options = ort.SessionOptions()
    options.log_severity_level = 3  # not the note that the policy inputs are overridable initializers
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # leave the cores to PyTorch
    session = ort.InferenceSession(str(exported.onnx_path), options, providers=["CPUExecutionProvider"])
    reference = copy.deepcopy(model).cpu().float().eval()
    generator = torch.Generator().manual_seed(seed)
    differences: dict[str, dict[int, float]] = {}
    for policy in policies:
        set_policy(reference, policy)
        differences[policy] = {}
        for n in sizes:
            images = torch.randn(n, *input_size, generator=generator)
            with torch.no_grad(), batch_groups(reference):
                expected = reference(images).numpy()
            feeds = {IMAGES: images.numpy(), **policy_feeds(policy, exported.robust)}
            (logits,) = session.run([LOGITS], feeds)
            differences[policy][n] = float(np.abs(logits - expected).max())
    return differences


def run(args: argparse.Namespace) -> int:
    """``robustnorm export``: write the ONNX graph and its card, print where they went (and the check)."""
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
