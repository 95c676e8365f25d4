"""robustnorm.fold: the folded frozen model answers as the unfolded one and records what its norm layers saw."""

from __future__ import annotations

import pytest
import torch

import robustnorm
from robustnorm import StreamStore, batch_groups, create_model
from robustnorm.fold import fold_frozen


def trained_like(norm: str, *, negative: bool = True) -> torch.nn.Module:
    """A small model with non-trivial running statistics and, with ``negative``, some negative norm weights
    (so that recovering a maximum must take the folded output's minimum)."""
    torch.manual_seed(3)
    model = create_model("resnet20", norm=norm, p=0.5)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 16, 16) * 1.5 + 0.2)
        if negative:
            for _, layer in robustnorm.policy_layers(model):
                layer.weight[::3] *= -0.7
                layer.bias.add_(torch.randn_like(layer.bias) * 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=["bn", "robustnorm"])
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return trained_like(request.param)


def assert_same_statistics(reference: robustnorm.GroupRun, folded: robustnorm.GroupRun, names: list[str],
                           rows: bool) -> None:
    assert list(folded.stats) == names
    for name in names:
        expected, got = reference.stats[name], folded.stats[name]
        for field in ("mean", "spread", "image_mean", "image_spread"):
            torch.testing.assert_close(getattr(got, field), getattr(expected, field), atol=2e-5, rtol=1e-4,
                                       msg=lambda m, name=name, field=field: f"{name}.{field}: {m}")
        torch.testing.assert_close(got.counts, expected.counts)
        if rows:
            assert got.image_rows is not None and expected.image_rows is not None
            torch.testing.assert_close(got.image_rows, expected.image_rows, atol=2e-5, rtol=1e-4)
        assert folded.robust_layers[name] == reference.robust_layers[name]
        for got_population, expected_population in zip(folded.population[name], reference.population[name]):
            torch.testing.assert_close(got_population, expected_population)


def test_folded_answers_and_records_as_the_unfolded_model(model: torch.nn.Module) -> None:
    folded = fold_frozen(model)
    assert folded.unfolded == []
    names = [name for name, _ in robustnorm.policy_layers(model)]
    x = torch.randn(7, 3, 16, 16)
    x[6] *= 50  # padding past the groups: never in a statistic
    sizes = [2, 4]
    with torch.inference_mode():
        with batch_groups(model, sizes, policy="frozen", record=True) as reference:
            expected = model(x)
        with folded.groups(sizes, record=None) as run:
            got = folded(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert run.ran == reference.ran == ["frozen", "frozen"]
    assert run.fallback == reference.fallback and run.stream_images == reference.stream_images
    assert_same_statistics(reference, run, names, rows=False)
    # only the layers asked for are recorded, and a forward outside groups() records nothing
    with torch.inference_mode(), folded.groups([7], record=names[:3]) as few:
        folded(x)
    assert list(few.stats) == names[:3]
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), expected, atol=1e-4, rtol=1e-4)


def test_a_layer_that_cannot_be_recovered_stays_unfolded() -> None:
    model = trained_like("robustnorm")
    name, layer = robustnorm.policy_layers(model)[1]
    with torch.no_grad():
        layer.weight[0] = 0.0  # scale 0: the folded output says nothing about this channel's input
    folded = fold_frozen(model)
    assert folded.unfolded == [name]
    x = torch.randn(5, 3, 16, 16)
    with torch.inference_mode():
        with batch_groups(model, [5], policy="frozen", record=True) as reference:
            expected = model(x)
        with folded.groups([5], record=None) as run:
            got = folded(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert_same_statistics(reference, run, [n for n, _ in robustnorm.policy_layers(model)], rows=False)


def test_auto_feeds_its_streams_as_the_unfolded_model(model: torch.nn.Module) -> None:
    """With no gate calibration, auto holds the population: both paths run frozen and push the same rows."""
    folded = fold_frozen(model)
    policy = robustnorm.parse_policy("auto:32:32")
    stores = {path: StreamStore(32) for path in ("unfolded", "folded")}
    torch.manual_seed(5)
    for step in range(3):
        x = torch.randn(6, 3, 16, 16) + step
        selection = stores["unfolded"].select(["a", "b"])
        with torch.inference_mode(), batch_groups(model, [2, 4], policy=policy, record=True,
                                                  streams=selection) as reference:
            expected = model(x)
        selection = stores["folded"].select(["a", "b"])
        assert folded.runs_frozen([2, 4], policy, selection)
        with torch.inference_mode(), folded.groups([2, 4], policy=policy, streams=selection) as run:
            got = folded(x)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert run.ran == reference.ran and run.stream_images == reference.stream_images
        assert_same_statistics(reference, run, list(reference.stats), rows=True)
    for key in ("a", "b"):
        held = {path: store.select([key]).streams[0] for path, store in stores.items()}
        assert held["folded"].count == held["unfolded"].count == 3 * (2 if key == "a" else 4)
        for name in reference.stats:
            for got, expected in zip(held["folded"].statistics(name), held["unfolded"].statistics(name)):
                torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("policy", ["batch", "blend:8", "stream:16:16", "adaptive:4"])
def test_policies_that_read_the_batch_are_refused(model: torch.nn.Module, policy: str) -> None:
    folded = fold_frozen(model)
    assert not folded.runs_frozen([8], policy, StreamStore(16).select(["a"]))
    with pytest.raises(ValueError, match="does not run frozen statistics"), \
            folded.groups([8], policy=policy, streams=StreamStore(16).select(["a"])):
        pass
    # adaptive below its threshold falls back to frozen for RobustNorm, and to a blend for BatchNorm
    robust = isinstance(robustnorm.policy_layers(model)[0][1], robustnorm.RobustNorm2d)
    assert folded.runs_frozen([2], "adaptive:4") == robust


def test_moves_and_dtypes_carry_the_recovery(model: torch.nn.Module) -> None:
    folded = fold_frozen(model).double()
    reference = fold_frozen(model)
    x = torch.randn(3, 3, 16, 16)
    with torch.inference_mode():
        with folded.groups([3], record=None) as run64:
            got = folded(x.double())
        with reference.groups([3], record=None) as run32:
            expected = reference(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), expected, atol=1e-4, rtol=1e-4)
    for name, stats in run64.stats.items():
        assert stats.mean.dtype == torch.float64
        torch.testing.assert_close(stats.image_mean.float(), run32.stats[name].image_mean, atol=2e-5, rtol=1e-4)


def test_a_norm_layer_not_after_a_convolution_cannot_be_folded() -> None:
    model = robustnorm.convert_norms(torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 4, 3))).eval()
    with pytest.raises(ValueError, match="does not follow a convolution"):
        fold_frozen(model)
