"""Stream statistics: the window's statistics, the store's bounds, tenant separation, reset, and the gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import robustnorm
from robustnorm.gate import FEATURE_SETS, GATE_FEATURES, GateCalibration, calibrate_gate, image_features
from robustnorm.policy import GroupPlan, parse_policy
from robustnorm.stream import StreamStore, image_fingerprints


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("norm", ["bn", "robustnorm"])
def test_a_stream_holds_the_statistics_of_its_last_window_images(norm: str) -> None:
    torch.manual_seed(0)
    model = robustnorm.create_model("resnet20", norm=norm, p=0.2).eval()
    images = torch.randn(10, 3, 32, 32) * 1.5 + 0.3
    store = StreamStore(6, max_batch_share=1.0)
    with torch.no_grad():
        for start in (0, 3, 7):  # batches of 3, 4 and 3 images: the window keeps the last 6
            stop = {0: 3, 3: 7, 7: 10}[start]
            with robustnorm.batch_groups(model, [stop - start], policy="stream:6", streams=store.select(["s"])):
                model(images[start:stop])
        first_name, first = robustnorm.policy_layers(model)[0]
        expected = first.group_statistics(model.conv1(images[4:]), (6,))  # the first norm layer's input
    stream = store.get("s")
    assert stream.count == 6 and stream.images == 10
    mean, spread = stream.statistics(first_name)
    assert torch.allclose(mean, expected.mean[0], atol=1e-5)
    assert torch.allclose(spread, expected.spread[0], rtol=1e-4, atol=1e-5)
    arrays = stream.statistics_arrays()  # what an ONNX graph is fed: the same values, every layer
    assert list(arrays) == [name for name, _ in robustnorm.policy_layers(model)]
    for name, (array_mean, array_spread) in arrays.items():
        held_mean, held_spread = stream.statistics(name)
        assert array_mean.dtype == array_spread.dtype == np.float32
        assert np.array_equal(array_mean, held_mean.numpy()) and np.array_equal(array_spread, held_spread.numpy())
    with torch.no_grad(), robustnorm.batch_groups(model, [3], policy="stream:6", streams=store.select(["s"])):
        model(images[:3] * 4)  # a push renews them
    assert not np.array_equal(stream.statistics_arrays()[first_name][1], arrays[first_name][1])
    assert np.array_equal(stream.statistics_arrays()[first_name][1], stream.statistics(first_name)[1].numpy())


def test_the_plan_mixes_population_stream_and_batch_by_image_counts() -> None:
    policy = parse_policy("stream:100:20")
    assert str(policy) == "stream:100:20" and policy.uses_streams

    class Held:
        count, shifted = 30, False

    (plan,) = policy.plan([10], robust=False, streams=[Held()])
    assert plan == GroupPlan("stream", 10 / 60, 30 / 60, stream_images=30)
    assert plan.population_weight == pytest.approx(20 / 60)
    (empty,) = policy.plan([10], robust=False)
    assert empty.stream_weight == 0 and empty.batch_weight == pytest.approx(10 / 30)
    auto = parse_policy("auto:64")
    assert str(auto) == "auto:64" and auto.n0 == 16
    assert auto.plan([4], True, [Held()])[0] == GroupPlan("frozen", 0.0, fallback=True, stream_images=30)
    Held.shifted = True
    assert auto.plan([4], True, [Held()])[0].statistics == "stream"
    for bad in ("stream", "stream:0", "stream:8:0", "auto:8:1:2", "stream:x"):
        with pytest.raises(ValueError, match="valid forms"):
            parse_policy(bad)


def test_the_store_is_bounded_expires_idle_streams_and_resets() -> None:
    clock = Clock()
    store = StreamStore(8, max_streams=2, idle_seconds=10, clock=clock)
    a, b = store.get("a"), store.get("b")
    store.get("a")  # a is now the most recently used
    store.get("c")
    assert store.keys() == ["a", "c"] and store.evicted == 1, "the least recently used stream is dropped"
    assert store.get("a") is a and store.peek("b") is None and b.key == "b"
    clock.now = 5
    store.get("c")
    clock.now = 12  # a was last used at 0, c at 5
    store.get("d")
    assert store.keys() == ["c", "d"] and store.expired == 1
    assert store.reset(["c", "nobody"]) == 1 and store.keys() == ["d"]
    assert store.reset() == 1 and len(store) == 0
    with pytest.raises(ValueError):
        StreamStore(0)


def test_tenants_streams_are_apart_and_one_batch_fills_at_most_its_share() -> None:
    torch.manual_seed(1)
    model = robustnorm.create_model("resnet20", norm="bn").eval()
    store = StreamStore(16, max_batch_share=0.25)
    with torch.no_grad(), robustnorm.batch_groups(model, [12, 2], policy="stream:16",
                                                  streams=store.select(["a", "b"])):
        model(torch.randn(14, 3, 32, 32))
    assert (store.get("a").count, store.get("b").count) == (4, 2), "a batch fills at most a quarter of the window"
    assert store.get(None).count == 0, "the global stream is a stream of its own"
    name = robustnorm.policy_layers(model)[0][0]
    assert not torch.equal(store.get("a").statistics(name)[0], store.get("b").statistics(name)[0])


def test_a_stream_counts_each_distinct_image_once() -> None:
    torch.manual_seed(2)
    model = robustnorm.create_model("resnet20", norm="robustnorm", p=0.2).eval()
    store = StreamStore(8, max_batch_share=1.0)
    images = torch.randn(6, 3, 32, 32)
    first_name = robustnorm.policy_layers(model)[0][0]

    def run(batch: torch.Tensor, policy: str = "stream:8") -> None:
        with torch.no_grad(), robustnorm.batch_groups(model, [batch.shape[0]], policy=policy,
                                                      streams=store.select(["s"])):
            model(batch)

    for _ in range(5):  # one image, again and again: one image held
        run(images[:1])
    stream = store.get("s")
    assert stream.images == 1
    held = stream.statistics(first_name)
    selection = store.select(["s"])
    with torch.no_grad(), robustnorm.batch_groups(model, [5], policy="stream:8", streams=selection):
        model(images[[0, 1, 1, 2, 0]])  # copies within a batch and of the window count once
    assert stream.images == 3 and selection.repeated == 3
    assert not torch.equal(stream.statistics(first_name)[0], held[0]), "new images move the statistics"
    run(images[[1, 2]])
    assert stream.images == 3, "a batch of copies only adds nothing"
    run(images[1:2] + 1e-3)
    assert stream.images == 4, "an image that differs is a new image"
    for _ in range(4):  # the window (8) forgets what it no longer holds: then a copy is new again
        run(torch.randn(2, 3, 32, 32))
    run(images[:1])
    assert stream.images == 13
    prints = image_fingerprints(torch.cat([images, images[:2]]))
    assert len(set(prints[:6])) == 6 and prints[6:8] == prints[:2], "equal images, equal fingerprints"
    large = image_fingerprints(torch.randn(2, 3, 224, 224).repeat(2, 1, 1, 1))  # only some of its values read
    assert large[:2] == large[2:] and large[0] != large[1]


def test_repeating_one_image_does_not_move_the_gate() -> None:
    features = image_features(torch.zeros(1, 3, 8, 8)).shape[1]
    gate = GateCalibration(class_mean=[[0.0] * features] * 10, class_std=[[1.0] * features] * 10, on=2.0, off=1.5,
                           min_images=4, features=GATE_FEATURES)
    model = robustnorm.create_model("resnet20", norm="bn").eval()
    torch.manual_seed(3)
    images = torch.randn(20, 3, 32, 32) * 3  # far from the calibration: high gate scores
    for copies, shifted in ((True, False), (False, True)):
        store = StreamStore(8, max_batch_share=1.0, gate=gate)
        for i in range(20):
            with torch.no_grad(), robustnorm.batch_groups(model, [1], policy="auto:8", streams=store.select(["s"])):
                model(images[:1] if copies else images[i:i + 1])
        stream = store.get("s")
        assert stream.shifted is shifted and stream.images == (1 if copies else 20)
        assert stream.gate_ring is not None and stream.gate_ring.count == (1 if copies else 8)


def _synthetic_gate() -> GateCalibration:
    features = image_features(torch.zeros(1, 3, 8, 8)).shape[1]
    return GateCalibration(class_mean=[[0.0] * features] * 2, class_std=[[1.0] * features] * 2, on=2.0, off=1.5,
                           min_images=4, features=GATE_FEATURES)


def test_gate_feature_sets_and_cards_fitted_before_the_fine_ratio() -> None:
    pixels = torch.rand(4, 3, 16, 16)
    assert image_features(pixels, "pixels").shape == (4, 3 * 5)
    assert image_features(pixels).shape == (4, 3 * len(FEATURE_SETS[GATE_FEATURES]))
    assert torch.equal(image_features(pixels)[:, :15], image_features(pixels, "pixels")), "the older set is a prefix"
    with pytest.raises(ValueError, match="unknown gate feature set"):
        image_features(pixels, "layer1")
    older = _synthetic_gate().to_dict()
    older.pop("features")
    older["class_mean"] = [[0.0] * 15] * 2
    older["class_std"] = [[1.0] * 15] * 2
    card_gate = GateCalibration.from_dict(older)  # a card written before the field existed
    assert card_gate.features == "pixels"
    assert card_gate.image_raw(pixels, torch.zeros(4, dtype=torch.long)).shape == (4,)


def test_the_fine_ratio_sees_detail_move_to_the_finest_scale() -> None:
    """Blurred images have little fine detail; shuffling their pixels locally (glass blur's second step) adds
    it back at the finest scale only, and the fine ratio rises although the image stays blurred."""
    generator = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(8, 3, 36, 36, generator=generator), 5, stride=1)
    shuffled = smooth.clone()
    swap = torch.rand(32, 31, generator=generator) < 0.5  # swap pixel pairs (x, x + 1) here and there
    left, right = shuffled[..., :-1][..., swap], shuffled[..., 1:][..., swap]
    shuffled[..., :-1][..., swap], shuffled[..., 1:][..., swap] = right, left
    ratio = FEATURE_SETS[GATE_FEATURES].index("log_fine_ratio")
    before = image_features(smooth)[:, ratio * 3:(ratio + 1) * 3]
    after = image_features(shuffled)[:, ratio * 3:(ratio + 1) * 3]
    assert (after > before + 0.1).all()


def test_the_gate_switches_with_hysteresis_on_a_drift_sequence() -> None:
    gate = _synthetic_gate()
    store = StreamStore(8, max_batch_share=1.0, gate=gate)
    stream = store.get("s")
    sequence = [1.0] * 3 + [1.2] * 8 + [1.8] * 8 + [2.5] * 6 + [1.8] * 8 + [1.6] * 8 + [1.0] * 8
    states, switches = [], []
    for value in sequence:
        changed = stream.update_gate(torch.tensor([value]), gate)
        states.append(stream.shifted)
        if changed is not None:
            switches.append(changed)
    assert stream.gate_score is not None
    assert not any(states[:19]), "in distribution, and between off and on, the gate holds"
    assert states[19 + 5], "shifted: the window's mean passes on"
    assert all(states[25:41]), "between off and on it stays adapted (hysteresis)"
    assert not states[-1], "back in distribution it switches back"
    assert switches == [True, False]


@pytest.mark.slow
def test_the_calibrated_gate_ignores_label_skew_and_sees_shift(cifar10: Path) -> None:
    from robustnorm.corruptions import corrupt
    from robustnorm.data import load_cifar10, normalize, to_float

    model, card = robustnorm.load_model("cifar10-resnet20-bn")
    test_set = load_cifar10("test", cifar10)
    order = torch.randperm(len(test_set.labels), generator=torch.Generator().manual_seed(0))
    pixels, labels = to_float(test_set.images[order]), test_set.labels[order]
    fit, test = slice(0, 3000), slice(3000, None)
    norm = lambda x: normalize(x, card.mean, card.std)
    gate = calibrate_gate(model, norm(pixels[fit]), labels[fit], window=128, classes=10)
    assert gate.on > gate.off > gate.samples["skewed_max"]

    def window_score(x: torch.Tensor) -> float:
        with torch.no_grad(), robustnorm.batch_groups(model, policy="frozen"):
            predicted = model(norm(x)).argmax(dim=1)
        return float(gate.image_raw(norm(x), predicted).mean())

    clean, test_labels = pixels[test], labels[test]
    for c in range(10):
        assert window_score(clean[test_labels == c][:128]) < gate.off, f"one class ({c}) is not a shift"
    assert window_score(clean[:256]) < gate.off
    for name in ("gaussian_noise", "contrast", "defocus_blur", "pixelate", "glass_blur", "frost"):
        assert window_score(corrupt(name, clean[:256], 5, 0)) > gate.on, name
    # Without the fine ratio (the feature set of cards calibrated before it), glass blur looks clean.
    legacy = calibrate_gate(model, norm(pixels[fit]), labels[fit], window=128, classes=10, features="pixels")
    with torch.no_grad(), robustnorm.batch_groups(model, policy="frozen"):
        predicted = model(norm(corrupt("glass_blur", clean[:256], 5, 0))).argmax(dim=1)
    assert float(legacy.image_raw(norm(corrupt("glass_blur", clean[:256], 5, 0)), predicted).mean()) < legacy.off


@pytest.mark.parametrize("norm", ["bn", "robustnorm"])
def test_a_trimmed_window_ignores_a_minority_of_extreme_images(norm: str) -> None:
    """One image in nine black or white in turn (a client sending garbage into a shared stream): with a trim of 0.2
    the first layer's window statistics (its input does not depend on the statistics) are those of the clean
    images alone, under the same trim; untrimmed they are far off."""
    torch.manual_seed(0)
    model = robustnorm.create_model("resnet20", norm=norm, p=0.2).eval()
    clean = torch.randn(72, 3, 32, 32) * 0.5
    mixed = clean.clone()
    mixed[::9] = torch.where(torch.arange(8).view(8, 1, 1, 1) % 2 == 0, -3.0, 3.0).expand(8, 3, 32, 32)
    alone = clean[[i for i in range(72) if i % 9]]
    first = robustnorm.policy_layers(model)[0][0]

    def window(images: torch.Tensor, trim: float) -> tuple[torch.Tensor, torch.Tensor]:
        store = StreamStore(72, max_batch_share=1.0, trim=trim)
        with torch.no_grad():
            for start in range(0, images.shape[0], 8):
                with robustnorm.batch_groups(model, [8], policy="stream:72", streams=store.select(["s"])):
                    model(images[start:start + 8])
        return store.get("s").statistics(first)

    def error(trim: float) -> tuple[float, float]:
        """The mean's largest error in units of the clean spread; the spread's median relative error."""
        (mean, spread), (ref_mean, ref_spread) = window(mixed, trim), window(alone, trim)
        scale = ref_spread.sqrt() if norm == "bn" else ref_spread
        return (float(((mean - ref_mean).abs() / scale).max()),
                float(((spread - ref_spread).abs() / ref_spread).median()))

    trimmed, untrimmed = error(0.2), error(0.0)
    assert max(trimmed) < 0.05, trimmed
    assert untrimmed[1] > 0.5, untrimmed


def test_a_trimmed_gate_score_ignores_a_minority_of_outliers() -> None:
    gate = _synthetic_gate()
    for trim, expected in ((0.0, True), (0.2, False)):
        stream = StreamStore(20, max_batch_share=1.0, trim=trim, gate=gate).get("s")
        for index in range(40):  # one image in ten scores far above `on`, the others as clean images do
            stream.update_gate(torch.tensor([50.0 if index % 10 == 9 else 1.0]), gate)
        assert stream.shifted is expected, (trim, stream.gate_score)
    stream = StreamStore(20, max_batch_share=1.0, trim=0.2, gate=gate).get("s")
    for _ in range(20):  # every image shifted: the trimmed score sees it
        stream.update_gate(torch.tensor([2.5]), gate)
    assert stream.shifted


def test_trim_is_a_share_below_half() -> None:
    with pytest.raises(ValueError, match="trim"):
        StreamStore(8, trim=0.5)


@pytest.mark.parametrize("robust", [True, False])
def test_the_window_summary_equals_the_statistics_of_the_rows_held(robust: bool) -> None:
    """Untrimmed windows are summarised per block of rows, refreshed by each push: after every push, whatever its
    size and however the ring wraps, the result equals the statistics of the rows the window holds."""
    from robustnorm.stream import Stream, rows_statistics

    torch.manual_seed(0)
    stream = Stream(key="s", window=40)
    fields = 3 if robust else 2
    for n in (17, 3, 16, 7, 33, 2, 40, 5, 64, 9, 1, 17):  # the first push ends on a block's first row
        new = torch.randn(n, fields, 6) * 3 - 20  # all negative: unwritten rows (zeros) must not count
        if robust:  # each image's row holds its mean, maximum and minimum
            new[:, 1] = new[:, 0] + new.abs().amax(dim=1) / 10
            new[:, 2] = new[:, 0] - new.abs().amax(dim=1) / 10
        stream.push({"a": new[:, :, :2], "b": new[:, :, 2:]}, {"a": robust, "b": robust})
        packed = stream.packed[robust]
        assert packed.summary is not None
        expected = rows_statistics(packed.ring.held(), robust)
        for name, (start, stop) in packed.spans.items():
            mean, spread = stream.statistics(name)
            assert torch.allclose(mean, expected[0][start:stop], atol=1e-5)
            assert torch.allclose(spread, expected[1][start:stop], atol=1e-5)
