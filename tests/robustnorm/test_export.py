"""ONNX export: the checker passes, and ONNX Runtime (CPU provider) matches PyTorch for every policy and size.

Parity: logits within 1e-4 of PyTorch's (eval mode under ``batch_groups(model, record=True)``) and the
exported per-layer statistics equal ``run.stats``, for models built here and every bundled model and the
policies frozen, batch, blend, adaptive (with default and explicit fallbacks): the adaptive policies at batch
sizes 1, 2, MIN_BATCH - 1, MIN_BATCH, 64 and 256, the others at 1, 2 and 64. One graph serves every policy
(fed as ``min_batch``/``fallback_n0``); one test runs through IO binding.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

import robustnorm
from robustnorm.export import (
    BATCH_WEIGHT,
    FALLBACK_N0,
    IMAGE_MEAN_SUFFIX,
    IMAGE_SPREAD_SUFFIX,
    IMAGES,
    LOGITS,
    MEAN_SUFFIX,
    MIN_BATCH,
    NEVER,
    SPREAD_SUFFIX,
    ExportedModel,
    card_path_for,
    export_onnx,
    policy_feeds,
)
from robustnorm.io import CIFAR10_LABELS, ModelCard

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

LOGIT_TOLERANCE = 1e-4
MIN = 16
SIZES = [1, 2, MIN - 1, MIN, 64, 256]
FEWER_SIZES = [1, 2, 64]  # non-adaptive policies do not switch at MIN_BATCH; 256 runs for the adaptive ones
POLICIES = ["frozen", "batch", "blend:16", f"adaptive:{MIN}", f"adaptive:{MIN}:frozen", f"adaptive:{MIN}:blend:4"]
BUILT = ["bn", "robustnorm"]


def trained_like(norm: str) -> torch.nn.Module:
    """A ResNet-20 with non-trivial affine parameters and running statistics (a fresh copy per call)."""
    return copy.deepcopy(_trained(norm))


@functools.cache
def _trained(norm: str) -> torch.nn.Module:
    torch.manual_seed(3)
    model = robustnorm.create_model("resnet20", norm=norm, p=0.2)
    with torch.no_grad():
        for _, layer in robustnorm.policy_layers(model):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_(0.0, 0.2)
        model.train()
        for _ in range(3):  # small images keep it quick; the running statistics do not depend on the size
            model(torch.randn(16, 3, 16, 16) * 1.3 + 0.3)
    return model.eval()


@dataclass
class Exported:
    model: torch.nn.Module
    card: ModelCard
    exported: ExportedModel
    session: ort.InferenceSession
    # PyTorch results by (statistics plan, batch size): adaptive policies share them with batch/blend/frozen.
    references: dict[tuple[str, int], tuple[np.ndarray, robustnorm.GroupRun]] = field(default_factory=dict)

    @property
    def min_batch(self) -> int:
        parsed = robustnorm.parse_policy(self.card.policy)
        return parsed.min_batch if parsed.kind == "adaptive" and parsed.min_batch else MIN

    def images(self, n: int) -> torch.Tensor:
        """The test batch of size ``n`` (the same for every policy, so PyTorch runs once per plan and size)."""
        generator = torch.Generator().manual_seed(1000 + n)
        return torch.randn(n, *self.card.input_size, generator=generator) * 1.2 + 0.1

    def reference(self, policy: str, n: int) -> tuple[np.ndarray, robustnorm.GroupRun]:
        """PyTorch's logits and recorded run (eval, ``batch_groups(record=True)``) for ``images(n)``."""
        key = (str(robustnorm.parse_policy(policy).resolve(n, self.exported.robust)), n)
        if key not in self.references:
            robustnorm.set_policy(self.model, policy)
            with torch.no_grad(), robustnorm.batch_groups(self.model, record=True) as run:
                logits = self.model(self.images(n))
            self.references[key] = (logits.numpy(), run)
        return self.references[key]


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the policy inputs are overridable initializers by design; no warning
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # leave the cores to PyTorch
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=BUILT + robustnorm.list_models())
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    if request.param in BUILT:
        model = trained_like(request.param)
        card = ModelCard(name=f"test-resnet20-{request.param}", architecture="resnet20", norm=request.param,
                         labels=list(CIFAR10_LABELS), p=0.2 if request.param == "robustnorm" else None,
                         policy=f"adaptive:{MIN}")
    else:
        model, card = robustnorm.load_model(request.param)
    path = tmp_path_factory.mktemp("onnx") / f"{card.name}.onnx"
    result = export_onnx(model, card, path)
    return Exported(model=model, card=card, exported=result, session=_session(path))


def _expected_weight(policy: str, n: int, robust: bool) -> float:
    plan = robustnorm.parse_policy(policy).resolve(n, robust)
    if plan.kind == "blend":
        assert plan.n0 is not None
        return n / (plan.n0 + n)
    return 1.0 if plan.kind == "batch" else 0.0


def _assert_matches(case: Exported, policy: str, n: int, outputs: dict[str, np.ndarray]) -> None:
    expected, run = case.reference(policy, n)
    difference = float(np.abs(outputs[LOGITS] - expected).max())
    assert difference < LOGIT_TOLERANCE, f"{policy} n={n}: max |logit difference| {difference:.2e}"
    assert float(outputs[BATCH_WEIGHT]) == pytest.approx(_expected_weight(policy, n, case.exported.robust), abs=1e-6)
    assert list(run.stats) and set(run.stats) == set(case.exported.layers)
    for name, stats in run.stats.items():
        np.testing.assert_allclose(outputs[name + MEAN_SUFFIX], stats.mean[0].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(outputs[name + SPREAD_SUFFIX], stats.spread[0].numpy(), rtol=1e-4, atol=1e-5)
        if name in case.exported.image_layers:
            np.testing.assert_allclose(outputs[name + IMAGE_MEAN_SUFFIX], stats.image_mean.numpy(),
                                       rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(outputs[name + IMAGE_SPREAD_SUFFIX], stats.image_spread.numpy(),
                                       rtol=1e-4, atol=1e-5)


def _feeds(case: Exported, policy: str | None, n: int) -> dict[str, np.ndarray]:
    """The ONNX Runtime inputs for ``images(n)``; ``policy=None`` leaves the graph's default policy."""
    feeds = {IMAGES: case.images(n).numpy()}
    return feeds if policy is None else {**feeds, **policy_feeds(policy, case.exported.robust)}


def _run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def test_checker_passes_and_card_travels_beside(exported: Exported) -> None:
    path = exported.exported.onnx_path
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert exported.exported.opset >= 17
    images = next(item for item in proto.graph.input if item.name == IMAGES)
    assert images.type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch axis
    card = robustnorm.read_card(card_path_for(path))
    assert card.policy == exported.card.policy == exported.exported.policy
    assert card.name == exported.card.name and card.norm == exported.card.norm
    assert json.loads(card_path_for(path).read_text())["version"] == exported.card.version
    described = ExportedModel.read(path)
    assert described.layers == [name for name, _ in robustnorm.policy_layers(exported.model)]
    calibration = exported.card.calibration
    expected_image_layers = calibration.image_layers if calibration is not None else described.layers[:3]
    assert described.image_layers == exported.exported.image_layers == expected_image_layers
    assert described.robust == (exported.card.norm == "robustnorm")
    expected_outputs = [LOGITS, BATCH_WEIGHT]
    for name in described.layers:
        expected_outputs += [name + MEAN_SUFFIX, name + SPREAD_SUFFIX]
        expected_outputs += ([name + IMAGE_MEAN_SUFFIX, name + IMAGE_SPREAD_SUFFIX] if name in described.image_layers
                             else [])
    assert described.output_names == expected_outputs == [output.name for output in proto.graph.output]
    # Serving reads the same description from ONNX Runtime's metadata, without the onnx package.
    from_session = ExportedModel.from_metadata(path, exported.session.get_modelmeta().custom_metadata_map)
    assert from_session == described
    for name, layer in robustnorm.policy_layers(exported.model):
        population_mean, population_spread = described.population[name]
        np.testing.assert_array_equal(population_mean, layer.running_mean.float().numpy())
        np.testing.assert_array_equal(population_spread, layer.running_var.float().numpy())
    # The batch statistics are graph operations, not constants folded from the running buffers.
    ops = {node.op_type for node in proto.graph.node}
    assert {"ReduceMean", "Where", "Shape", "GreaterOrEqual"} <= ops
    assert ({"ReduceMax", "ReduceMin"} <= ops) == described.robust


@pytest.mark.parametrize("policy", POLICIES)
def test_onnxruntime_matches_pytorch(exported: Exported, policy: str) -> None:
    for n in SIZES if policy.startswith("adaptive") else FEWER_SIZES:
        _assert_matches(exported, policy, n, _run(exported.session, _feeds(exported, policy, n)))


def test_card_policy_around_its_min_batch(exported: Exported) -> None:
    """The card's own policy (bundled models may use another MIN_BATCH) at MIN - 1 and MIN, fed explicitly."""
    policy = exported.card.policy
    for n in sorted({max(1, exported.min_batch - 1), exported.min_batch}):
        _assert_matches(exported, policy, n, _run(exported.session, _feeds(exported, policy, n)))


def test_default_policy_needs_no_policy_inputs(exported: Exported) -> None:
    """Without min_batch/fallback_n0 the graph runs the card's policy: the Where switches on the batch size."""
    for n in sorted({max(1, exported.min_batch - 1), exported.min_batch}):
        _assert_matches(exported, exported.card.policy, n, _run(exported.session, _feeds(exported, None, n)))


def test_io_binding_gives_the_same_outputs(exported: Exported) -> None:
    session, policy, n = exported.session, f"adaptive:{MIN}:blend:4", MIN - 1
    feeds = _feeds(exported, policy, n)
    binding = session.io_binding()
    binding.bind_cpu_input(IMAGES, feeds[IMAGES])
    # The policy inputs are overridable initializers, which bind as OrtValues (bind_cpu_input looks the name
    # up among the plain inputs only).
    for name in (MIN_BATCH, FALLBACK_N0):
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(feeds[name]))
    names = [output.name for output in session.get_outputs()]
    for name in names:
        binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    bound = dict(zip(names, binding.copy_outputs_to_cpu()))
    plain = _run(session, feeds)
    for name in names:
        np.testing.assert_array_equal(bound[name], plain[name])
    _assert_matches(exported, policy, n, bound)


def test_export_policy_sets_the_graph_default(tmp_path: Path) -> None:
    model = trained_like("bn")
    card = ModelCard(name="bn-blend", architecture="resnet20", norm="bn", labels=list(CIFAR10_LABELS))
    result = export_onnx(model, card, tmp_path / "nested" / "model.onnx", policy="blend:8")
    assert result.policy == "blend:8" and result.card_path == tmp_path / "nested" / "model.card.json"
    assert robustnorm.read_card(result.card_path).policy == "blend:8"
    assert card.policy == "frozen"  # the caller's card is left alone
    case = Exported(model=model, card=card, exported=result, session=_session(result.onnx_path))
    _assert_matches(case, "blend:8", 3, _run(case.session, _feeds(case, None, 3)))


def test_policy_feeds_encode_every_policy() -> None:
    def feeds(policy: str, robust: bool) -> tuple[int, float]:
        values = policy_feeds(policy, robust)
        assert values[MIN_BATCH].dtype == np.int64 and values[FALLBACK_N0].dtype == np.float32
        return int(values[MIN_BATCH]), float(values[FALLBACK_N0])

    assert feeds("frozen", False) == (NEVER, 0.0)
    assert feeds("batch", True) == (1, 0.0)
    assert feeds("blend:32", False) == (NEVER, 32.0)
    assert feeds("adaptive:16", False) == (16, 16.0)  # BatchNorm falls back to blend:16
    assert feeds("adaptive:16", True) == (16, 0.0)  # RobustNorm falls back to its tracked statistics
    assert feeds("adaptive:8:blend:2.5", True) == (8, 2.5)
    assert feeds("adaptive:8:frozen", False) == (8, 0.0)


def test_export_rejects_what_it_cannot_represent(tmp_path: Path) -> None:
    model = trained_like("bn")
    card = ModelCard(name="bn", architecture="resnet20", norm="bn", labels=list(CIFAR10_LABELS))
    with pytest.raises(ValueError, match="opset 17"):
        export_onnx(model, card, tmp_path / "old.onnx", opset=13)
    with pytest.raises(ValueError, match="image_layers"):
        export_onnx(model, card, tmp_path / "bad.onnx", image_layers=["fc"])
    model.layer1[0].bn1 = robustnorm.RobustNorm2d(16)
    with pytest.raises(ValueError, match="mixes"):
        export_onnx(model, card, tmp_path / "mixed.onnx")


def test_cli_exports_a_saved_model_and_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from robustnorm.cli import main

    model = trained_like("robustnorm")
    card = ModelCard(name="rn", architecture="resnet20", norm="robustnorm", p=0.2, labels=list(CIFAR10_LABELS),
                     policy="adaptive:4")
    robustnorm.save_model(model, card, tmp_path / "saved")
    output = tmp_path / "out" / "rn.onnx"
    status = main(["export", str(tmp_path / "saved"), "-o", str(output), "--policy", "adaptive:8:blend:2",
                   "--verify", "--verify-sizes", "1,8"])
    summary = json.loads(capsys.readouterr().out)
    assert status == 0, summary
    assert summary["onnx"] == str(output) and output.is_file()
    assert summary["policy"] == "adaptive:8:blend:2"
    assert robustnorm.read_card(output.with_name("rn.card.json")).policy == "adaptive:8:blend:2"
    assert summary["verify"]["worst"] < LOGIT_TOLERANCE
