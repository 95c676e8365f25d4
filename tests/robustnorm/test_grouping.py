"""Grouped statistics: padding never changes real outputs; groups equal running each group on its own."""

from __future__ import annotations

import pytest
import torch

import robustnorm
from robustnorm import batch_groups, create_model, set_policy

POLICIES = ["frozen", "batch", "blend:8", "adaptive:4", "adaptive:4:blend:2"]


def trained_like(norm: str) -> torch.nn.Module:
    """A small model with non-trivial running statistics (a few training steps on random data)."""
    torch.manual_seed(1)
    model = create_model("resnet20", norm=norm, p=0.5)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 16, 16) * 1.5 + 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=["bn", "robustnorm"])
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return trained_like(request.param)


@pytest.mark.parametrize("policy", POLICIES)
def test_groups_equal_separate_batches(model: torch.nn.Module, policy: str) -> None:
    set_policy(model, policy)
    sizes = [1, 5, 3, 4]
    x = torch.randn(sum(sizes), 3, 16, 16)
    with torch.no_grad(), batch_groups(model, sizes) as run:
        grouped = model(x)
    separate, ran = [], []
    with torch.no_grad():
        for chunk in x.split(sizes):
            with batch_groups(model) as alone:
                separate.append(model(chunk))
            ran += alone.ran
    assert torch.allclose(grouped, torch.cat(separate), atol=1e-5)
    assert run.ran == ran
    if policy == "adaptive:4":
        robust = isinstance(robustnorm.policy_layers(model)[0][1], robustnorm.RobustNorm2d)
        assert run.ran == ["frozen" if robust else "blend", "batch", "frozen" if robust else "blend", "batch"]
        assert run.fallback == [True, False, True, False]


@pytest.mark.parametrize("policy", POLICIES)
def test_padding_never_changes_real_outputs(model: torch.nn.Module, policy: str) -> None:
    set_policy(model, policy)
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        with batch_groups(model, [6]):
            alone = model(x)
        for padding in (torch.zeros(4, 3, 16, 16), torch.randn(10, 3, 16, 16) * 100, torch.full((1, 3, 16, 16), 1e4)):
            with batch_groups(model, [2, 4]):
                split_alone = model(x)
            with batch_groups(model, [2, 4]):
                padded = model(torch.cat([x, padding]))
            assert torch.allclose(padded[:6], split_alone, atol=1e-5)
            with batch_groups(model, [6]):
                padded_one = model(torch.cat([x, padding]))
            assert torch.allclose(padded_one[:6], alone, atol=1e-5)


def test_padding_gets_no_gradient_from_real_outputs(model: torch.nn.Module) -> None:
    set_policy(model, "batch")
    x = torch.randn(7, 3, 16, 16, requires_grad=True)
    with batch_groups(model, [5]):
        model(x)[:5].sum().backward()
    assert x.grad[5:].abs().sum() == 0
    assert x.grad[:5].abs().sum() > 0


def test_recorded_statistics_cover_real_images_only(model: torch.nn.Module) -> None:
    set_policy(model, "frozen")
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad(), batch_groups(model, [2, 3], record=True) as run:
        model(torch.cat([x, torch.randn(3, 3, 16, 16) * 50]))
    first = run.stats["bn1"]
    conv = model.conv1(x)
    assert torch.allclose(first.mean[0], conv[:2].mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(first.image_mean, conv.mean(dim=(2, 3)), atol=1e-5)
    # each image's own spread, in the layer's measure: biased variance, or range for RobustNorm
    own = (conv.amax(dim=(2, 3)) - conv.amin(dim=(2, 3)) if model.bn1.robust
           else conv.var(dim=(2, 3), unbiased=False))
    assert torch.allclose(first.image_spread, own, rtol=1e-4, atol=1e-5)
    assert first.counts.tolist() == [2, 3]
    assert len(run.stats) == len(robustnorm.policy_layers(model))


def test_bad_group_sizes_are_rejected(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="positive integers"), batch_groups(model, [2, 0]):
        pass
    with pytest.raises(ValueError, match="add up to more"), batch_groups(model, [4, 4]):
        model(torch.randn(5, 3, 16, 16))


def test_context_is_removed_after_the_forward(model: torch.nn.Module) -> None:
    with batch_groups(model, [1]):
        pass
    assert all(layer.group_run is None for _, layer in robustnorm.policy_layers(model))


def test_model_without_norm_layers_reports_frozen() -> None:
    model = create_model("resnet20", norm="none").eval()
    with torch.no_grad(), batch_groups(model, [2, 1]) as run:
        model(torch.randn(3, 3, 16, 16))
    assert run.ran == ["frozen", "frozen"]


@pytest.mark.parametrize("policy", ["stream:8", "stream:8:4", "auto:8"])
def test_one_group_blends_as_the_padded_general_path(model: torch.nn.Module, policy: str) -> None:
    """A batch that is one group takes a shortcut (the plan's weights as numbers, one product for every weighted
    sum); with padding the general path runs. Both must give the same outputs and record the same statistics,
    stream policies included (population, stream and batch weighed together)."""
    shifted, x = torch.randn(5, 3, 16, 16) * 2 + 0.5, torch.randn(6, 3, 16, 16)
    stores = [robustnorm.StreamStore(8, max_batch_share=1.0) for _ in range(2)]
    with torch.no_grad():
        for store in stores:  # two streams holding the same 5 shifted images
            with batch_groups(model, [5], policy=policy, streams=store.select(["s"])):
                model(shifted)
        with batch_groups(model, [6], policy=policy, record=True, streams=stores[0].select(["s"])) as fast:
            one = model(x)
        with batch_groups(model, [6], policy=policy, record=True, streams=stores[1].select(["s"])) as general:
            padded = model(torch.cat([x, torch.randn(3, 3, 16, 16) * 50]))
    assert fast.ran == general.ran and fast.stream_images == general.stream_images == [5]
    assert torch.allclose(padded[:6], one, atol=1e-5)
    for name, stats in fast.stats.items():
        assert torch.allclose(general.stats[name].mean, stats.mean, atol=1e-6)
        assert torch.allclose(general.stats[name].spread, stats.spread, atol=1e-6)


def test_frozen_statistics_follow_the_layers_parameters(model: torch.nn.Module) -> None:
    """Frozen scale and shift are made once per parameter version: a changed weight or running statistic shows
    in the next forward."""
    set_policy(model, "frozen")
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        before = model(x)
    _, first = robustnorm.policy_layers(model)[0]
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        first.running_mean.add_(0.5)
    with torch.inference_mode():
        moved = model(x)
    model.load_state_dict(state)
    with torch.inference_mode():
        restored = model(x)
    assert not torch.allclose(moved, before, atol=1e-3)
    assert torch.equal(restored, before)


def test_frozen_statistics_follow_moves_and_replaced_tensors() -> None:
    """Moving a layer to another dtype or replacing a tensor's data keeps no stale scale and shift."""
    layer = trained_like("robustnorm")
    set_policy(layer, "frozen")
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        before = layer(x)
    layer.double()
    with torch.inference_mode():
        doubled = layer(x.double())
    assert doubled.dtype == torch.float64 and torch.allclose(doubled.float(), before, atol=1e-4)
    layer.float()
    with torch.inference_mode():
        assert torch.allclose(layer(x), before, atol=1e-5)
    _, first = robustnorm.policy_layers(layer)[0]
    with torch.no_grad():
        first.weight.data = first.weight.data * 2  # a new storage, the same version
    with torch.inference_mode():
        scaled = layer(x)
    assert not torch.allclose(scaled, before, atol=1e-3)
