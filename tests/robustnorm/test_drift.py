"""Drift measures: exactly zero at the population, growing with an injected shift; calibrated scores."""

from __future__ import annotations

import math

import pytest
import torch

from robustnorm import batch_groups, calibrate_drift, create_model, drift_report, layer_drift, set_policy
from robustnorm.drift import DriftCalibration, image_features


def reference_drift(batch_mean: torch.Tensor, batch_spread: torch.Tensor, population_mean: torch.Tensor,
                    population_spread: torch.Tensor, robust: bool) -> dict[str, float]:
    eps = 1e-5
    shifts, logs, kls = [], [], []
    for c in range(batch_mean.numel()):
        if robust:
            sd_b, sd_p = float(batch_spread[c]) + eps, float(population_spread[c]) + eps
        else:
            sd_b, sd_p = math.sqrt(float(batch_spread[c]) + eps), math.sqrt(float(population_spread[c]) + eps)
        delta = float(batch_mean[c] - population_mean[c])
        shifts.append(abs(delta) / sd_p)
        logs.append(math.log(sd_b / sd_p) if robust else math.log(sd_b**2 / sd_p**2))
        kls.append(math.log(sd_p / sd_b) + (sd_b**2 + delta**2) / (2 * sd_p**2) - 0.5)
    count = batch_mean.numel()
    return {"mean_shift": sum(shifts) / count, "log_var_ratio": sum(logs) / count, "kl": sum(kls) / count}


@pytest.mark.parametrize("robust", [False, True])
def test_measures_match_reference_and_are_zero_at_population(robust: bool) -> None:
    torch.manual_seed(0)
    population_mean = torch.randn(6, dtype=torch.float64)
    population_spread = torch.rand(6, dtype=torch.float64) + 0.5
    zero = layer_drift(population_mean[None], population_spread[None], population_mean, population_spread, robust)
    assert all(float(value[0]) == 0.0 for value in zero.values())
    batch_mean = population_mean + torch.randn(6, dtype=torch.float64)
    batch_spread = population_spread * (torch.rand(6, dtype=torch.float64) + 0.5)
    measured = layer_drift(batch_mean[None], batch_spread[None], population_mean, population_spread, robust)
    expected = reference_drift(batch_mean, batch_spread, population_mean, population_spread, robust)
    for measure, value in expected.items():
        assert float(measured[measure][0]) == pytest.approx(value, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("robust", [False, True])
def test_measures_grow_with_an_injected_shift(robust: bool) -> None:
    population_mean, population_spread = torch.zeros(4), torch.ones(4)
    previous = None
    for shift in (0.0, 0.5, 1.0, 2.0, 4.0):
        batch = layer_drift(torch.full((1, 4), shift), torch.full((1, 4), 1.0 + shift), population_mean,
                            population_spread, robust)
        values = {k: float(v[0]) for k, v in batch.items()}
        if previous is not None:
            assert all(values[k] > previous[k] for k in values)
        previous = values


def small_trained(norm: str) -> torch.nn.Module:
    torch.manual_seed(2)
    model = create_model("resnet20", norm=norm, p=0.5)
    data = torch.randn(256, 3, 16, 16)
    model.train()
    with torch.no_grad():
        for _ in range(30):  # running statistics converge to this data's population
            model(data[torch.randperm(256)[:64]])
    return model.eval()


@pytest.mark.parametrize("norm", ["bn", "robustnorm"])
def test_forward_drift_is_zero_when_batch_equals_population_and_rises_with_shift(norm: str) -> None:
    model = small_trained(norm)
    set_policy(model, "frozen")
    # Make the population equal the statistics of this exact batch in every layer: then every measure is zero.
    x = torch.randn(32, 3, 16, 16)
    with torch.no_grad(), batch_groups(model, record=True) as run:
        model(x)
    for name, layer in [(n, m) for n, m in model.named_modules() if n in run.stats]:
        layer.running_mean.copy_(run.stats[name].mean[0])
        layer.running_var.copy_(run.stats[name].spread[0])
    with torch.no_grad(), batch_groups(model, record=True) as run:
        model(x)
    report = drift_report(run)
    # the first layer's input does not depend on earlier normalisation, so it is exactly at its population
    assert all(abs(values[0]) < 1e-6 for values in report.layers["bn1"].values())
    with torch.no_grad(), batch_groups(model, record=True) as shifted_run:
        model(x + 1.0)
    shifted = drift_report(shifted_run)
    assert shifted.layers["bn1"]["mean_shift"][0] > 0.1
    assert shifted.raw_batch[0] > report.raw_batch[0]


@pytest.mark.parametrize("norm", ["bn", "robustnorm"])
def test_drift_report_measures_every_layer_as_layer_drift_does(norm: str) -> None:
    """drift_report measures all layers of a forward at once (channels side by side, averaged per layer by a
    matrix product); each layer's values must be layer_drift's on that layer alone, for every group."""
    model = small_trained(norm)
    set_policy(model, "batch")
    with torch.no_grad(), batch_groups(model, [3, 8, 1], record=True) as run:
        model(torch.randn(12, 3, 16, 16) * 1.5 + 0.3)
    report = drift_report(run)
    assert len(report.layers) == len(run.stats) > 3
    kl_per_layer = []
    for name, stats in run.stats.items():
        population_mean, population_spread = run.population[name]
        expected = layer_drift(stats.mean, stats.spread, population_mean, population_spread, run.robust_layers[name])
        for measure, values in expected.items():
            assert report.layers[name][measure] == pytest.approx(values.tolist(), rel=1e-5, abs=1e-6), (name, measure)
        kl_per_layer.append(expected["kl"])
    assert report.raw_batch == pytest.approx(torch.stack(kl_per_layer).mean(dim=0).tolist(), rel=1e-5)


@pytest.mark.parametrize("norm", ["bn", "robustnorm"])
def test_calibrated_scores_center_clean_batches_and_flag_shifted_ones(norm: str) -> None:
    model = small_trained(norm)
    set_policy(model, "frozen")
    torch.manual_seed(3)
    clean = torch.randn(512, 3, 16, 16)
    calibration = calibrate_drift(model, clean, batch_sizes=(1, 4, 16, 64), batches_per_size=48)
    assert calibration.batch_sizes == [1, 4, 16, 64]
    fresh = torch.randn(256, 3, 16, 16)
    for n in (1, 4, 16, 64):
        with torch.no_grad(), batch_groups(model, [n] * (256 // n), record=True) as run:
            model(fresh)
        scores = drift_report(run, calibration).batch_score
        assert all(abs(score) < 4 for score in scores), (n, scores)
        if len(scores) >= 16:
            assert abs(sum(scores) / len(scores)) < 0.75, (n, scores[:5])
    with torch.no_grad(), batch_groups(model, [16] * 16, record=True) as run:
        model(fresh)
    clean_report = drift_report(run, calibration)
    with torch.no_grad(), batch_groups(model, [16] * 16, record=True) as run:
        model(fresh * 3 + 1)
    noisy_report = drift_report(run, calibration)
    assert min(noisy_report.batch_score) > max(clean_report.batch_score)
    clean_above = sum(score > 1 for score in clean_report.image_score) / 256
    noisy_above = sum(score > 1 for score in noisy_report.image_score) / 256
    assert clean_above < 0.05
    assert noisy_above > 0.5


@pytest.mark.parametrize("norm", ["bn", "robustnorm"])
def test_image_score_sees_spread_changes_that_leave_channel_means_in_place(norm: str) -> None:
    model = small_trained(norm)
    set_policy(model, "frozen")
    torch.manual_seed(4)
    calibration = calibrate_drift(model, torch.randn(512, 3, 16, 16), batch_sizes=(1, 16), batches_per_size=8)
    assert calibration.image_features == "mean+log_spread"
    fresh = torch.randn(256, 3, 16, 16)
    # each image's pixels pulled towards its own mean: channel means unchanged, spreads a quarter
    flat = fresh.mean(dim=(2, 3), keepdim=True) + 0.25 * (fresh - fresh.mean(dim=(2, 3), keepdim=True))

    def above(images: torch.Tensor, calibration: DriftCalibration) -> float:
        with torch.no_grad(), batch_groups(model, [16] * 16, record=True) as run:
            model(images)
        scores = drift_report(run, calibration).image_score
        return sum(score > 1 for score in scores) / len(scores)

    assert above(fresh, calibration) < 0.05
    assert above(flat, calibration) > 0.9
    # the older means-only score (cards calibrated before spreads) is still read and scored as it was
    means_only = calibrate_means_only(model, calibration)
    assert above(fresh, means_only) < 0.05
    assert DriftCalibration.from_dict({k: v for k, v in means_only.to_dict().items()
                                       if k != "image_features"}).image_features == "mean"


def calibrate_means_only(model: torch.nn.Module, calibration: DriftCalibration) -> DriftCalibration:
    """The means-only calibration of the same clean images, as cards written before spreads hold it."""
    torch.manual_seed(4)
    clean = torch.randn(512, 3, 16, 16)
    with torch.no_grad(), batch_groups(model, record=True) as run:
        model(clean)
    features = image_features(run, calibration.image_layers, "mean")
    mean, std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-6)
    raw = ((features - mean) / std).square().mean(dim=1)
    return DriftCalibration(**{**calibration.to_dict(), "image_feature_mean": mean.tolist(),
                               "image_feature_std": std.tolist(), "image_features": "mean",
                               "image_threshold": float(torch.quantile(raw, 0.99))})


def test_drift_report_requires_recording() -> None:
    model = small_trained("bn")
    with torch.no_grad(), batch_groups(model) as run:
        model(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="record=True"):
        drift_report(run)
