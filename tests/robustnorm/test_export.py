"""ONNX export: the checker passes, and ONNX Runtime (CPU provider) matches PyTorch for every policy and size.

Parity: logits within 1e-4 of PyTorch's (eval mode under ``batch_groups(model, policy=..., record=True)``) and
the exported per-layer statistics and per-image rows equal ``run.stats``, for models built here and every
bundled model and the policies frozen, batch, blend, adaptive (with default and explicit fallbacks) and
stream (with a filled stream): the adaptive policies at batch sizes 1, 2, MIN_BATCH - 1, MIN_BATCH, 64 and
256, the others at 1, 2 and 64. One graph serves every policy: the plan's weights and the stream's statistics
are fed (:func:`plan_feeds`); one test runs through IO binding.
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
from robustnorm.data import CIFAR10_CLASSES
from robustnorm.export import (
    BATCH_WEIGHT,
    IMAGE_ROWS_SUFFIX,
    IMAGES,
    LOGITS,
    MEAN_SUFFIX,
    SPREAD_SUFFIX,
    STREAM_MEAN_SUFFIX,
    STREAM_SPREAD_SUFFIX,
    STREAM_WEIGHT,
    ExportedModel,
    card_path_for,
    export_onnx,
    folded_path_for,
    graph_input_names,
    plan_feeds,
)
from robustnorm.io import ModelCard

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
        """PyTorch's logits and recorded run (eval, ``batch_groups(policy=..., record=True)``) for ``images(n)``."""
        key = (str(robustnorm.parse_policy(policy).resolve(n, self.exported.robust)), n)
        if key not in self.references:
            with torch.no_grad(), robustnorm.batch_groups(self.model, [n], policy=policy, record=True) as run:
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
                         labels=list(CIFAR10_CLASSES), p=0.2 if request.param == "robustnorm" else None,
                         policy=f"adaptive:{MIN}")
    else:
        model, card = robustnorm.load_model(request.param)
    path = tmp_path_factory.mktemp("onnx") / f"{card.name}.onnx"
    result = export_onnx(model, card, path)
    return Exported(model=model, card=card, exported=result, session=_session(path))


def _assert_statistics(case: Exported, run: robustnorm.GroupRun, outputs: dict[str, np.ndarray]) -> None:
    assert list(run.stats) and set(run.stats) == set(case.exported.layers)
    for name, stats in run.stats.items():
        np.testing.assert_allclose(outputs[name + MEAN_SUFFIX], stats.mean[0].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(outputs[name + SPREAD_SUFFIX], stats.spread[0].numpy(), rtol=1e-4, atol=1e-5)
        assert stats.image_rows is not None
        np.testing.assert_allclose(outputs[name + IMAGE_ROWS_SUFFIX], stats.image_rows.numpy(), rtol=1e-4, atol=1e-5)


def _assert_matches(case: Exported, policy: str, n: int, outputs: dict[str, np.ndarray]) -> None:
    expected, run = case.reference(policy, n)
    difference = float(np.abs(outputs[LOGITS] - expected).max())
    assert difference < LOGIT_TOLERANCE, f"{policy} n={n}: max |logit difference| {difference:.2e}"
    _assert_statistics(case, run, outputs)


def _feeds(case: Exported, policy: str | None, n: int) -> dict[str, np.ndarray]:
    """The ONNX Runtime inputs for ``images(n)``; ``policy=None`` feeds the images only (frozen)."""
    feeds = {IMAGES: case.images(n).numpy()}
    if policy is None:
        return feeds
    (plan,) = robustnorm.parse_policy(policy).plan([n], case.exported.robust)
    return {**feeds, **plan_feeds(plan)}


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
    assert described.robust == (exported.card.norm == "robustnorm")
    expected_outputs = [LOGITS]
    for name in described.layers:
        expected_outputs += [name + MEAN_SUFFIX, name + SPREAD_SUFFIX, name + IMAGE_ROWS_SUFFIX]
    assert described.output_names == expected_outputs == [output.name for output in proto.graph.output]
    assert [item.name for item in proto.graph.input] == graph_input_names(described.layers)
    # Serving reads the same description from ONNX Runtime's metadata, without the onnx package.
    from_session = ExportedModel.from_metadata(path, exported.session.get_modelmeta().custom_metadata_map)
    assert from_session == described
    for name, layer in robustnorm.policy_layers(exported.model):
        population_mean, population_spread = described.population[name]
        np.testing.assert_array_equal(population_mean, layer.running_mean.float().numpy())
        np.testing.assert_array_equal(population_spread, layer.running_var.float().numpy())
    # The batch statistics are graph operations, not constants folded from the running buffers.
    ops = {node.op_type for node in proto.graph.node}
    assert "ReduceMean" in ops
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


def test_images_alone_run_the_population_statistics(exported: Exported) -> None:
    """Every input but the images is an initializer holding frozen statistics."""
    for n in (1, 3):
        _assert_matches(exported, "frozen", n, _run(exported.session, _feeds(exported, None, n)))


def test_stream_plans_match_pytorch_with_a_filled_stream(exported: Exported) -> None:
    policy = robustnorm.parse_policy("stream:32:8")
    store = robustnorm.StreamStore(32, max_batch_share=1.0)
    for n in (5, 9, 1):  # fill the stream as a service would, batch after batch
        with torch.no_grad(), robustnorm.batch_groups(exported.model, [n], policy=policy,
                                                      streams=store.select(["s"])):
            exported.model(exported.images(n) + 0.5)
    stream = store.get("s")
    assert stream.count == 15
    for n in (1, 4):  # each reference forward adds its images to the stream, as a service's would
        (plan,) = policy.plan([n], exported.exported.robust, [stream])
        assert plan.statistics == "stream" and plan.stream_images == stream.count
        held = {name: stats for name in exported.exported.layers if (stats := stream.statistics(name)) is not None}
        feeds = {IMAGES: exported.images(n).numpy(), **plan_feeds(plan, held)}
        assert {name + STREAM_MEAN_SUFFIX for name in exported.exported.layers} <= set(feeds)
        with torch.no_grad(), robustnorm.batch_groups(exported.model, [n], policy=policy, record=True,
                                                      streams=[stream]) as run:
            expected = exported.model(exported.images(n)).numpy()
        outputs = _run(exported.session, feeds)
        assert float(np.abs(outputs[LOGITS] - expected).max()) < LOGIT_TOLERANCE
        _assert_statistics(exported, run, outputs)


def test_io_binding_gives_the_same_outputs(exported: Exported) -> None:
    session, policy, n = exported.session, f"adaptive:{MIN}:blend:4", MIN - 1
    feeds = _feeds(exported, policy, n)
    binding = session.io_binding()
    binding.bind_cpu_input(IMAGES, feeds[IMAGES])
    # The plan inputs are overridable initializers, which bind as OrtValues (bind_cpu_input looks the name
    # up among the plain inputs only).
    for name in (BATCH_WEIGHT, STREAM_WEIGHT):
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


def test_export_policy_is_recorded_with_the_graph(tmp_path: Path) -> None:
    model = trained_like("bn")
    card = ModelCard(name="bn-blend", architecture="resnet20", norm="bn", labels=list(CIFAR10_CLASSES))
    result = export_onnx(model, card, tmp_path / "nested" / "model.onnx", policy="blend:8")
    assert result.policy == "blend:8" and result.card_path == tmp_path / "nested" / "model.card.json"
    assert robustnorm.read_card(result.card_path).policy == "blend:8"
    assert card.policy == "frozen"  # the caller's card is left alone
    case = Exported(model=model, card=card, exported=result, session=_session(result.onnx_path))
    _assert_matches(case, "blend:8", 3, _run(case.session, _feeds(case, "blend:8", 3)))


def test_plan_feeds_carry_the_weights_and_the_stream() -> None:
    plan = robustnorm.GroupPlan("stream", 0.25, 0.5, stream_images=8)
    feeds = plan_feeds(plan, {"bn1": (torch.ones(4), torch.full((4,), 2.0))})
    assert feeds[BATCH_WEIGHT].dtype == np.float32 and float(feeds[BATCH_WEIGHT]) == 0.25
    assert float(feeds[STREAM_WEIGHT]) == 0.5
    np.testing.assert_array_equal(feeds["bn1" + STREAM_SPREAD_SUFFIX], np.full(4, 2.0, dtype=np.float32))
    frozen = plan_feeds(robustnorm.parse_policy("frozen").plan([3], False)[0], {"bn1": (torch.ones(4),) * 2})
    assert set(frozen) == {BATCH_WEIGHT, STREAM_WEIGHT}, "no stream statistics where the stream has no weight"


def test_export_rejects_what_it_cannot_represent(tmp_path: Path) -> None:
    model = trained_like("bn")
    card = ModelCard(name="bn", architecture="resnet20", norm="bn", labels=list(CIFAR10_CLASSES))
    with pytest.raises(ValueError, match="opset 17"):
        export_onnx(model, card, tmp_path / "old.onnx", opset=13)
    model.layer1[0].bn1 = robustnorm.RobustNorm2d(16)
    with pytest.raises(ValueError, match="mixes"):
        export_onnx(model, card, tmp_path / "mixed.onnx")


def test_cli_exports_a_saved_model_and_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from robustnorm.cli import main

    model = trained_like("robustnorm")
    card = ModelCard(name="rn", architecture="resnet20", norm="robustnorm", p=0.2, labels=list(CIFAR10_CLASSES),
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


@pytest.mark.parametrize("n", [1, 2, 64])
def test_the_folded_graphs_output_what_the_full_graph_does_under_frozen(exported: Exported, n: int) -> None:
    """Beside each export: 'frozen' records the card's image-score layers, 'frozen-rows' every layer; each
    output equals the full graph's under the frozen plan (and PyTorch's)."""
    calibration = exported.card.calibration
    for kind, layers in (("frozen", list(calibration.image_layers) if calibration is not None else []),
                         ("frozen-rows", exported.exported.layers)):
        path = folded_path_for(exported.exported.onnx_path, kind)
        session = _session(path)
        assert json.loads(session.get_modelmeta().custom_metadata_map["robustnorm.layers"]) == layers
        outputs = _run(session, {IMAGES: exported.images(n).numpy()})
        assert set(outputs) == {LOGITS} | {name + suffix for name in layers
                                           for suffix in (MEAN_SUFFIX, SPREAD_SUFFIX, IMAGE_ROWS_SUFFIX)}
        full = _run(exported.session, _feeds(exported, "frozen", n))
        for name, value in outputs.items():
            tolerance = {"rtol": 1e-4, "atol": 1e-5} if name != LOGITS else {"rtol": 0, "atol": LOGIT_TOLERANCE}
            np.testing.assert_allclose(value, full[name], err_msg=f"{kind} {name}", **tolerance)
