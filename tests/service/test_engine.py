"""The engine: what it answers equals the library's offline output, with padding, groups and policy switches."""

from __future__ import annotations

import dataclasses
import json
import logging
import textwrap
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import robustnorm
from service.batcher import Batch, BatchKey, WorkItem
from service.engine import TorchEngine, default_model, pad_sizes, resolve_device
from service.engine_onnx import create_engine
from service.settings import Settings

LABELS = [f"class{i}" for i in range(10)]


@pytest.fixture(scope="module")
def robust_model() -> tuple[nn.Module, robustnorm.ModelCard]:
    torch.manual_seed(0)
    model = robustnorm.create_model("resnet20", norm="robustnorm", p=0.2).eval()
    card = robustnorm.ModelCard(name="tiny", architecture="resnet20", norm="robustnorm", p=0.2, labels=LABELS,
                                policy="adaptive:4")
    robustnorm.set_policy(model, card.policy)
    return model, card


def make_batch(groups: list[list[torch.Tensor]], policy: str, top_k: int = 3) -> Batch:
    items = [[WorkItem(id=f"r{g}-{i}:0", pixels=pixels, key=BatchKey(policy, str(g)), top_k=top_k, enqueued_at=0.0,
                       deadline=1e9, future=Future())  # type: ignore[arg-type]
              for i, pixels in enumerate(group)] for g, group in enumerate(groups)]
    return Batch(id="test-1", policy=policy, groups=items)


def offline(model: nn.Module, pixels: torch.Tensor, sizes: list[int], policy: str) -> tuple[torch.Tensor, list[str]]:
    robustnorm.set_policy(model, policy)
    with torch.inference_mode(), robustnorm.batch_groups(model, sizes, record=True) as run:
        probabilities = model(pixels).softmax(dim=1)
    return probabilities, run.ran


def test_pad_sizes_are_powers_of_two_up_to_the_max() -> None:
    assert pad_sizes(32) == (1, 2, 4, 8, 16, 32)
    assert pad_sizes(24) == (1, 2, 4, 8, 16, 24)


def test_the_default_model_is_the_bundled_default_or_a_variant_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    default = robustnorm.DEFAULT_MODEL
    for bundled, expected in (([], default), ([default, "other"], default),
                              (["other", f"{default}-preview"], f"{default}-preview"), (["other"], "other")):
        monkeypatch.setattr(robustnorm, "list_models", lambda bundled=bundled: bundled)
        assert default_model() == expected


def test_auto_device_is_the_cpu_without_a_gpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_padding_never_changes_an_answer(robust_model: tuple[nn.Module, robustnorm.ModelCard]) -> None:
    model, card = robust_model
    torch.manual_seed(1)
    requests = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    padded = TorchEngine(model, card, device=torch.device("cpu"), policy="adaptive:4", max_batch_size=16,
                         padding=True)
    output = padded.forward(make_batch([requests], "adaptive:4"))
    assert output.padded_to == 8 and output.images == 5
    expected, ran = offline(model, torch.cat(requests), [5], "adaptive:4")
    assert ran == ["batch"]
    answers = output.results["r0-0:0"] + output.results["r0-1:0"]
    for row, answer in enumerate(answers):
        assert answer.group.statistics == "batch" and answer.group.size == 5 and not answer.group.fallback
        assert answer.index == int(expected[row].argmax())
        assert [t.score for t in answer.top_k] == pytest.approx(expected[row].topk(3).values.tolist(), abs=1e-5)
    padded.close()


def test_groups_are_normalised_apart_and_policies_switch_per_batch(
        robust_model: tuple[nn.Module, robustnorm.ModelCard]) -> None:
    model, card = robust_model
    torch.manual_seed(2)
    tenant_a, tenant_b = [torch.randn(4, 3, 32, 32)], [torch.randn(1, 3, 32, 32)]
    engine = TorchEngine(model, card, device=torch.device("cpu"), policy="adaptive:4", max_batch_size=8,
                         padding=False)
    output = engine.forward(make_batch([tenant_a, tenant_b], "adaptive:4"))
    assert [(g.size, g.statistics, g.fallback) for g in output.groups] == [(4, "batch", False), (1, "frozen", True)]
    alone_a, _ = offline(model, tenant_a[0], [4], "adaptive:4")
    alone_b, _ = offline(model, tenant_b[0], [1], "adaptive:4")
    assert output.results["r0-0:0"][0].score == pytest.approx(float(alone_a[0].max()), abs=1e-5)
    assert output.results["r1-0:0"][0].score == pytest.approx(float(alone_b[0].max()), abs=1e-5)
    frozen = engine.forward(make_batch([tenant_a], "frozen"))
    assert [(g.statistics, g.fallback, g.policy) for g in frozen.groups] == [("frozen", False, "frozen")]
    again = engine.forward(make_batch([tenant_a], "adaptive:4"))
    assert again.groups[0].statistics == "batch"
    assert set(output.layers) == {name for name, _ in robustnorm.policy_layers(model)}
    engine.close()


def test_drift_is_scored_only_under_the_policy_it_was_calibrated_for(
        robust_model: tuple[nn.Module, robustnorm.ModelCard], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, card = robust_model
    torch.manual_seed(3)
    robustnorm.set_policy(model, card.policy)
    calibrated = dataclasses.replace(card, calibration=robustnorm.calibrate_drift(
        model, torch.randn(64, 3, 32, 32), batch_sizes=(1, 4, 8), batches_per_size=8))
    engine = TorchEngine(model, calibrated, device=torch.device("cpu"), policy=card.policy, max_batch_size=8,
                         padding=False)
    pixels = [torch.randn(4, 3, 32, 32)]
    for policy, scored in ((card.policy, True), ("frozen", False), ("batch", False)):
        output = engine.forward(make_batch([pixels], policy))
        assert isinstance(output.groups[0].batch_score, float) == scored, policy
        assert (output.image_scores is not None) == scored, policy
        assert output.groups[0].layers, "per-layer drift is reported under every policy"
    engine.close()

    robustnorm.save_model(model, calibrated, tmp_path)
    with caplog.at_level(logging.WARNING, logger="service.engine_onnx"):
        create_engine(Settings(model=str(tmp_path), device="cpu", policy="frozen")).close()
    assert "calibrated for policy adaptive:4, not for frozen" in caplog.text
    assert "robustnorm calibrate" in caplog.text


def test_any_batchnorm_model_as_module_factory_with_weights_and_card(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tiny_bn_net.py").write_text(textwrap.dedent('''
        from torch import nn

        def build():
            return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    import tiny_bn_net

    save_file(tiny_bn_net.build().state_dict(), str(tmp_path / "weights.safetensors"))
    (tmp_path / "card.json").write_text(json.dumps({"labels": ["a", "b", "c"], "input_size": [3, 16, 16],
                                                    "mean": [0.5] * 3, "std": [0.25] * 3, "policy": "adaptive:8"}))
    settings = Settings(model="tiny_bn_net:build", weights=tmp_path / "weights.safetensors",
                        card=tmp_path / "card.json", device="cpu", policy="adaptive:2")
    engine = TorchEngine.from_settings(settings)
    assert engine.policy == "adaptive:2" and engine.card.policy == "adaptive:8"  # the flag wins over the card
    assert engine.preprocessing(100).shape == (3, 16, 16)
    lone = engine.forward(make_batch([[torch.randn(1, 3, 16, 16)]], engine.policy))
    assert (lone.groups[0].statistics, lone.groups[0].fallback) == ("blend", True)  # BatchNorm falls back to blend
    pair = engine.forward(make_batch([[torch.randn(2, 3, 16, 16)]], engine.policy))
    assert pair.groups[0].statistics == "batch"
    assert pair.results["r0-0:0"][0].label in {"a", "b", "c"}
    engine.close()


def test_an_unknown_model_fails_with_what_to_do() -> None:
    with pytest.raises(ValueError, match="save_model"):
        TorchEngine.from_settings(Settings(model="no-such-model", device="cpu"))
