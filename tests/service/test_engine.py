"""The engine: what it answers equals the library's offline output, with padding, groups and policy switches."""

from __future__ import annotations

import dataclasses
import json
import logging
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import robustnorm
from service.engines import GroupSpec, TorchEngine, default_model, load_engine, pad_sizes, resolve_device
from service.settings import Settings

LABELS = [f"class{i}" for i in range(10)]
P = robustnorm.parse_policy


@pytest.fixture(scope="module")
def robust_model() -> tuple[nn.Module, robustnorm.ModelCard]:
    torch.manual_seed(0)
    model = robustnorm.create_model("resnet20", norm="robustnorm", p=0.2).eval()
    card = robustnorm.ModelCard(name="tiny", architecture="resnet20", norm="robustnorm", p=0.2, labels=LABELS,
                                policy="adaptive:4")
    return model, card


def make_engine(model: nn.Module, card: robustnorm.ModelCard, policy: str = "adaptive:4", max_batch_size: int = 8,
                padding: bool = False) -> TorchEngine:
    return TorchEngine(model, card, device=torch.device("cpu"), policy=P(policy), max_batch_size=max_batch_size,
                       padding=padding)


def offline(model: nn.Module, pixels: torch.Tensor, sizes: list[int], policy: str) -> tuple[torch.Tensor, list[str]]:
    with torch.inference_mode(), robustnorm.batch_groups(model, sizes, policy=policy, record=True) as run:
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
    pixels = torch.randn(5, 3, 32, 32)
    padded = make_engine(model, card, max_batch_size=16, padding=True)
    probabilities, report = padded.run(pixels, [GroupSpec(5)], P("adaptive:4"))
    assert report.padded_to == 8 and report.images == 5 and probabilities.shape == (5, 10)
    expected, ran = offline(model, pixels, [5], "adaptive:4")
    assert ran == ["batch"]
    assert [(g.statistics, g.size, g.fallback) for g in report.groups] == [("batch", 5, False)]
    assert torch.allclose(probabilities, expected, atol=1e-5)


def test_groups_are_normalised_apart_and_policies_switch_per_batch(
        robust_model: tuple[nn.Module, robustnorm.ModelCard]) -> None:
    model, card = robust_model
    torch.manual_seed(2)
    tenant_a, tenant_b = torch.randn(4, 3, 32, 32), torch.randn(1, 3, 32, 32)
    engine = make_engine(model, card)
    probabilities, report = engine.run(torch.cat([tenant_a, tenant_b]), [GroupSpec(4, "a"), GroupSpec(1, "b")],
                                       P("adaptive:4"))
    assert [(g.size, g.statistics, g.fallback) for g in report.groups] == [(4, "batch", False), (1, "frozen", True)]
    alone_a, _ = offline(model, tenant_a, [4], "adaptive:4")
    alone_b, _ = offline(model, tenant_b, [1], "adaptive:4")
    assert torch.allclose(probabilities, torch.cat([alone_a, alone_b]), atol=1e-5)
    _, frozen = engine.run(tenant_a, [GroupSpec(4)], P("frozen"))
    assert [(g.statistics, g.fallback) for g in frozen.groups] == [("frozen", False)]
    _, again = engine.run(tenant_a, [GroupSpec(4)], P("adaptive:4"))
    assert again.groups[0].statistics == "batch"
    assert set(report.layers) == {name for name, _ in robustnorm.policy_layers(model)}
    assert all(layer.policy == P("frozen") for _, layer in robustnorm.policy_layers(model)), \
        "the engine passes the policy to each forward; it never changes the layers' own"


def test_streams_adapt_single_images_per_tenant_and_reset(robust_model: tuple[nn.Module, robustnorm.ModelCard]
                                                          ) -> None:
    model, card = robust_model
    torch.manual_seed(4)
    engine = make_engine(model, card, policy="stream:8")
    policy = P("stream:8")
    images = torch.randn(12, 3, 32, 32)
    held = []
    for image in images:
        _, report = engine.run(image[None], [GroupSpec(1, "a")], policy)
        held.append(report.groups[0].stream_images)
        assert report.groups[0].statistics == "stream"
    assert held == [0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8], "the stream holds the last WINDOW images"
    engine.run(images[:4], [GroupSpec(4, "c")], policy)
    _, after = engine.run(images[:1], [GroupSpec(1, "c")], policy)
    assert after.groups[0].stream_images == 2, "one batch fills at most max_batch_share (1/4) of the window"
    engine.reset_streams(["c"])
    # The answer under a stream equals the library's: stream statistics of the images before it.
    store = robustnorm.StreamStore(8)
    for image in images[:-1]:
        with torch.inference_mode(), robustnorm.batch_groups(model, [1], policy=policy, streams=store.select(["a"])):
            model(image[None])
    with torch.inference_mode(), robustnorm.batch_groups(model, [1], policy=policy, streams=store.select(["a"])):
        expected = model(images[-1:]).softmax(dim=1)
    engine.reset_streams(["a"])
    for image in images[:-1]:
        engine.run(image[None], [GroupSpec(1, "a")], policy)
    probabilities, _ = engine.run(images[-1:], [GroupSpec(1, "a")], policy)
    assert torch.allclose(probabilities, expected, atol=1e-5)
    # Another tenant starts from the population; a reset forgets one tenant's stream only.
    _, other = engine.run(images[:1], [GroupSpec(1, "b")], policy)
    assert other.groups[0].stream_images == 0 and engine.stream_count() == 2
    assert engine.reset_streams(["a"]) == 1 and engine.stream_count() == 1
    assert engine.reset_streams() == 1 and engine.stream_count() == 0


def test_drift_is_scored_only_under_the_policy_it_was_calibrated_for(
        robust_model: tuple[nn.Module, robustnorm.ModelCard], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, card = robust_model
    torch.manual_seed(3)
    robustnorm.set_policy(model, card.policy)
    calibrated = dataclasses.replace(card, calibration=robustnorm.calibrate_drift(
        model, torch.randn(64, 3, 32, 32), batch_sizes=(1, 4, 8), batches_per_size=8))
    robustnorm.set_policy(model, "frozen")
    engine = make_engine(model, calibrated, policy=card.policy)
    pixels = torch.randn(4, 3, 32, 32)
    for policy, scored in ((card.policy, True), ("frozen", False), ("batch", False)):
        _, report = engine.run(pixels, [GroupSpec(4)], P(policy))
        assert isinstance(report.groups[0].batch_score, float) == scored, policy
        assert (report.image_scores is not None) == scored, policy
        assert report.layers, "per-layer drift is reported under every policy"

    robustnorm.save_model(model, calibrated, tmp_path)
    with caplog.at_level(logging.WARNING, logger="service.engines.loader"):
        load_engine(Settings(model=str(tmp_path), device="cpu", policy="frozen")).close()
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
    engine = load_engine(settings)
    assert str(engine.policy) == "adaptive:2" and engine.card.policy == "adaptive:8"  # the flag wins over the card
    assert list(engine.card.input_size) == [3, 16, 16]
    _, lone = engine.run(torch.randn(1, 3, 16, 16), [GroupSpec(1)], engine.policy)
    assert (lone.groups[0].statistics, lone.groups[0].fallback) == ("blend", True)  # BatchNorm falls back to blend
    probabilities, pair = engine.run(torch.randn(2, 3, 16, 16), [GroupSpec(2)], engine.policy)
    assert pair.groups[0].statistics == "batch" and probabilities.shape == (2, 3)
    engine.close()


def test_an_unknown_model_fails_with_what_to_do() -> None:
    with pytest.raises(ValueError, match="save_model"):
        load_engine(Settings(model="no-such-model", device="cpu"))


@pytest.mark.parametrize("policy", ["frozen", "adaptive:4"])
def test_unscored_frozen_batches_run_the_folded_model_with_the_same_answers(
        robust_model: tuple[nn.Module, robustnorm.ModelCard], policy: str) -> None:
    """drift="none" (a batch whose per-layer drift nobody scores): the folded copy answers, with the same
    probabilities and image scores as the unfolded model, and no per-layer drift."""
    model, card = robust_model
    torch.manual_seed(4)
    robustnorm.set_policy(model, policy)  # drift is scored under the policy it was calibrated for
    calibrated = dataclasses.replace(card, policy=policy, calibration=robustnorm.calibrate_drift(
        model, torch.randn(64, 3, 32, 32), batch_sizes=(1, 4), batches_per_size=8))
    robustnorm.set_policy(model, "frozen")
    engine = make_engine(model, calibrated, policy=policy, max_batch_size=8, padding=True)
    assert engine.folded is not None
    calls = {"model": 0, "folded": 0}
    hooks = [engine.model.register_forward_hook(lambda *_: calls.__setitem__("model", calls["model"] + 1)),
             engine.folded.register_forward_hook(lambda *_: calls.__setitem__("folded", calls["folded"] + 1))]
    pixels = torch.randn(3, 3, 32, 32)  # padded to 4; adaptive:4 falls back to frozen for RobustNorm
    scored_probabilities, scored = engine.run(pixels, [GroupSpec(1), GroupSpec(2)], P(policy))
    assert calls == {"model": 1, "folded": 0}
    probabilities, unscored = engine.run(pixels, [GroupSpec(1), GroupSpec(2)], P(policy), drift="none")
    assert calls == {"model": 1, "folded": 1}
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(probabilities, scored_probabilities, atol=1e-5, rtol=1e-4)
    assert scored.image_scores is not None and unscored.image_scores is not None
    torch.testing.assert_close(torch.tensor(unscored.image_scores), torch.tensor(scored.image_scores),
                               atol=1e-4, rtol=1e-3)
    assert [(g.statistics, g.fallback) for g in unscored.groups] == [(g.statistics, g.fallback)
                                                                     for g in scored.groups]
    assert scored.layers and unscored.layers == {} and unscored.pending is None
    assert all(group.batch_score is None for group in unscored.groups)
    # a policy that reads the batch never takes the folded model
    _, batch = engine.run(pixels, [GroupSpec(3)], P("batch"), drift="none")
    assert batch.groups[0].statistics == "batch"


def test_a_model_that_cannot_be_folded_serves_unscored_batches_unfolded() -> None:
    torch.manual_seed(8)
    model = robustnorm.convert_norms(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1),
                                                   nn.Flatten(), nn.Linear(4, 3))).eval()
    card = robustnorm.ModelCard(name="unfoldable", architecture="custom", norm="bn", labels=["a", "b", "c"],
                                policy="frozen", input_size=[3, 16, 16])
    engine = make_engine(model, card, policy="frozen")
    assert engine.folded is None
    pixels = torch.randn(2, 3, 16, 16)
    scored, _ = engine.run(pixels, [GroupSpec(2)], P("frozen"))
    unscored, report = engine.run(pixels, [GroupSpec(2)], P("frozen"), drift="none")
    torch.testing.assert_close(unscored, scored)
    assert report.groups[0].statistics == "frozen" and report.pending is None
