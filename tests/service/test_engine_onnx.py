"""The ONNX Runtime engine answers exactly as the PyTorch engine does: per batch, per group and over HTTP.

The engine-level tests need no data set; the server test starts both engines for real (uvicorn on loopback)
on the CIFAR-10 test model of ``conftest.py`` and sends each the same requests, one at a time so that every
request is its own batch, under the card's policy and per-request overrides.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from service_support import MIN_BATCH, LiveServer, Sample, serve

import robustnorm
from robustnorm.export import export_onnx
from service.app import create_app
from service.engines import BatchReport, GroupSpec, TorchEngine, choose_engine, load_engine
from service.engines.loader import settle_torch_threads
from service.engines.onnx import CPU_PROVIDER, CUDA_PROVIDER, TENSORRT_PROVIDER, OnnxEngine, choose_providers
from service.settings import Settings

pytest.importorskip("onnxruntime")

LABELS = [f"class{i}" for i in range(10)]
ENGINE_POLICY = "adaptive:4"
TOLERANCE = {"rel": 1e-4, "abs": 1e-5}


def assert_same(torch_value: Any, onnx_value: Any, where: str = "") -> None:
    """Equal structures; floats equal within float32 tolerance (the engines sum in different orders)."""
    if isinstance(torch_value, dict):
        assert isinstance(onnx_value, dict) and set(torch_value) == set(onnx_value), where
        for key in torch_value:
            assert_same(torch_value[key], onnx_value[key], f"{where}.{key}")
    elif isinstance(torch_value, (list, tuple)):
        assert isinstance(onnx_value, (list, tuple)) and len(torch_value) == len(onnx_value), where
        for i, (a, b) in enumerate(zip(torch_value, onnx_value)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(torch_value, float) and not isinstance(onnx_value, bool):
        assert onnx_value == pytest.approx(torch_value, **TOLERANCE), where
    else:
        assert torch_value == onnx_value, where


@pytest.fixture(scope="module", params=["robustnorm", "bn"])
def saved_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ResNet-20 with running statistics and a drift calibration (random images: statistics, not accuracy)."""
    torch.manual_seed(0)
    model = robustnorm.create_model("resnet20", norm=request.param, p=0.2)
    images = torch.randn(48, 3, 32, 32)
    model.train()
    with torch.no_grad():
        for chunk in images.split(16):
            model(chunk)
    model.eval()
    robustnorm.set_policy(model, ENGINE_POLICY)
    calibration = robustnorm.calibrate_drift(model, images, batch_sizes=(1, 4, 16), batches_per_size=4)
    card = robustnorm.ModelCard(name=f"tiny-{request.param}", architecture="resnet20", norm=request.param,
                                p=0.2 if request.param == "robustnorm" else None, labels=LABELS,
                                policy=ENGINE_POLICY, calibration=calibration)
    directory = tmp_path_factory.mktemp("model")
    robustnorm.save_model(model, card, directory)
    return directory


def comparable(result: tuple[torch.Tensor, BatchReport]) -> dict[str, Any]:
    """What a batch answers, without timings."""
    probabilities, report = result
    return {"probabilities": probabilities.tolist(), "groups": [dataclasses.asdict(g) for g in report.groups],
            "image_scores": report.image_scores, "layers": report.layers, "images": report.images}


def run(engine: TorchEngine | OnnxEngine, groups: list[list[torch.Tensor]], policy: str
        ) -> tuple[torch.Tensor, BatchReport]:
    """One batch of groups (a group: requests of one tenant) under ``policy``."""
    pixels = torch.cat([request for group in groups for request in group])
    specs = [GroupSpec(sum(int(request.shape[0]) for request in group), f"tenant{g}") for g, group in enumerate(groups)]
    return engine.run(pixels, specs, robustnorm.parse_policy(policy))


@pytest.fixture(scope="module")
def engines(saved_model: Path) -> Iterator[tuple[TorchEngine, OnnxEngine]]:
    """Both engines on the saved model, chosen by the ``engine`` setting."""
    torch_engine = load_engine(Settings(model=str(saved_model), device="cpu", engine="torch"))
    onnx_engine = load_engine(Settings(model=str(saved_model), device="cpu", engine="onnx"))
    assert isinstance(onnx_engine, OnnxEngine) and not isinstance(torch_engine, OnnxEngine)
    yield torch_engine, onnx_engine
    torch_engine.close()
    onnx_engine.close()


def test_engines_answer_alike_for_groups_and_policy_switches(engines: tuple[TorchEngine, OnnxEngine]) -> None:
    torch_engine, onnx_engine = engines
    assert onnx_engine.providers == [CPU_PROVIDER] and onnx_engine.pad_sizes == ()
    assert (onnx_engine.card.name, onnx_engine.card.version) == (torch_engine.card.name, torch_engine.card.version)
    torch.manual_seed(5)
    batches = [  # (groups of requests, policy): tenants grouped apart, below and at MIN_BATCH, every policy
        ([[torch.randn(3, 3, 32, 32), torch.randn(1, 3, 32, 32)], [torch.randn(1, 3, 32, 32)]], ENGINE_POLICY),
        ([[torch.randn(2, 3, 32, 32)], [torch.randn(7, 3, 32, 32)], [torch.randn(3, 3, 32, 32)]], "adaptive:4:blend:2"),
        ([[torch.randn(5, 3, 32, 32)]], "frozen"),
        ([[torch.randn(1, 3, 32, 32)]], "batch"),
        ([[torch.randn(2, 3, 32, 32), torch.randn(4, 3, 32, 32)]], "blend:4"),
        ([[torch.randn(2, 3, 32, 32)]], ENGINE_POLICY),
        *[([[torch.randn(1, 3, 32, 32)], [torch.randn(2, 3, 32, 32)]], "stream:6:4") for _ in range(5)],
        ([[torch.randn(3, 3, 32, 32)]], "stream:6:4"),
    ]
    for groups, policy in batches:
        expected = run(torch_engine, groups, policy)
        answered = run(onnx_engine, groups, policy)
        scored = policy == ENGINE_POLICY  # drift is scored under the policy it was calibrated for only
        assert (answered[1].groups[0].batch_score is not None) == scored == (answered[1].image_scores is not None)
        assert_same(comparable(expected), comparable(answered), policy)
    assert answered[1].groups[0].stream_images == 5, "tenant0 sent five single images before"
    assert torch_engine.stream_count() == onnx_engine.stream_count() == 2


def test_unscored_frozen_batches_run_the_folded_graphs(engines: tuple[TorchEngine, OnnxEngine],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """drift="none" with every group frozen: the folded graph answers as the full one (and as PyTorch), with the
    same image scores and, under auto while its gate holds, the same rows pushed into the streams."""
    torch_engine, onnx_engine = engines
    assert set(onnx_engine.folded) == {"frozen", "frozen-rows"}
    used: list[str] = []
    for kind, (graph, _) in onnx_engine.folded.items():
        monkeypatch.setattr(graph, "run", lambda *args, kind=kind, run=graph.run: used.append(kind) or run(*args))
    torch.manual_seed(6)
    robust = onnx_engine.exported.robust
    # the calibrated policy: below MIN_BATCH RobustNorm falls back to frozen (folded), BatchNorm to a blend
    groups = [[torch.randn(1, 3, 32, 32)], [torch.randn(2, 3, 32, 32)]]
    pixels = torch.cat([request for group in groups for request in group])
    specs = [GroupSpec(1, "tenant0"), GroupSpec(2, "tenant1")]
    expected = run(torch_engine, groups, ENGINE_POLICY)
    answered = onnx_engine.run(pixels, specs, robustnorm.parse_policy(ENGINE_POLICY), drift="none")
    assert used == (["frozen", "frozen"] if robust else [])
    assert answered[1].pending is None and answered[1].layers == {}
    unscored = {**comparable(expected), "layers": {}}  # no per-layer drift, and no batch scores
    unscored["groups"] = [{**group, "batch_score": None} for group in unscored["groups"]]
    assert_same(unscored, comparable(answered))
    # auto without a gate calibration holds the population: frozen, and every layer's rows feed the streams
    used.clear()
    auto = robustnorm.parse_policy("auto:8:8")
    for _ in range(3):
        batch = [[torch.randn(2, 3, 32, 32)], [torch.randn(1, 3, 32, 32)]]
        expected, answered = run(torch_engine, batch, str(auto)), onnx_engine.run(
            torch.cat([request for group in batch for request in group]), [GroupSpec(2, "tenant0"),
                                                                             GroupSpec(1, "tenant1")], auto,
            drift="none")
        assert [group.statistics for group in answered[1].groups] == ["frozen", "frozen"]
        torch.testing.assert_close(answered[0], expected[0], rtol=1e-4, atol=1e-5)
    assert used == ["frozen-rows"] * 6
    for key in ("tenant0", "tenant1"):
        held = [engine._stores[str(auto)].select([key]).streams[0] for engine in (torch_engine, onnx_engine)]
        assert held[0].count == held[1].count == (6 if key == "tenant0" else 3)
        for name in onnx_engine.exported.layers:
            for a, b in zip(held[0].statistics(name), held[1].statistics(name)):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_an_exported_onnx_file_serves_with_its_card(saved_model: Path, engines: tuple[TorchEngine, OnnxEngine],
                                                    tmp_path: Path) -> None:
    model, card = robustnorm.load_model(saved_model)
    exported = export_onnx(model, card, tmp_path / "served.onnx", policy="blend:4")
    engine = load_engine(Settings(model=str(exported.onnx_path), device="cpu", engine="onnx"))
    try:
        assert isinstance(engine, OnnxEngine) and str(engine.policy) == "blend:4"  # the card beside the file
        assert engine.card.version == card.version
        # ... whose drift calibration still says it was made under adaptive:4, so blend:4 batches get no score
        blend = robustnorm.parse_policy("blend:4")
        assert str(engine.calibrated_policy) == ENGINE_POLICY and engine.drift_calibration(blend) is None
        groups = [[torch.randn(3, 3, 32, 32)]]
        assert_same(comparable(run(engines[0], groups, "blend:4")), comparable(run(engine, groups, "blend:4")))
    finally:
        engine.close()


def test_auto_engine_is_onnx_runtime_on_the_cpu_where_installed(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().engine == "auto"
    assert choose_engine(Settings(device="cpu")) == "onnx"  # onnxruntime and onnx are installed for the tests
    assert choose_engine(Settings(device="cpu", engine="torch")) == "torch"
    assert choose_engine(Settings(model=str(tmp_path / "m.onnx"), device="cpu")) == "onnx"
    # where onnxruntime is not installed (whether it is lies outside the test's control: the lookup stands in)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "onnxruntime" else real_find_spec(name, *args))
    assert choose_engine(Settings(device="cpu")) == "torch"


def test_auto_engine_serves_with_pytorch_what_cannot_be_exported(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    import robustnorm.export

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("this model has an operator ONNX does not know")

    monkeypatch.setattr(robustnorm.export, "export_onnx", refuse)
    engine = load_engine(Settings(device="cpu"))
    try:
        assert type(engine).__name__ == "TorchEngine"
        assert "serving it with PyTorch" in caplog.text
    finally:
        engine.close()


def test_missing_onnx_file_and_engine_setting_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="engine"):
        Settings(engine="tensorflow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not found"):
        load_engine(Settings(model=str(tmp_path / "absent.onnx"), device="cpu", engine="onnx"))


def test_providers_follow_the_device_setting() -> None:
    cpu_only = [CPU_PROVIDER]
    gpu = [TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER]
    assert choose_providers("auto", cpu_only, input_size=[3, 32, 32], max_batch_size=8) == (torch.device("cpu"),
                                                                                            [CPU_PROVIDER])
    assert choose_providers("cpu", gpu, input_size=[3, 32, 32], max_batch_size=8)[1] == [CPU_PROVIDER]
    with pytest.raises(ValueError, match="onnxruntime-gpu"):
        choose_providers("cuda", cpu_only, input_size=[3, 32, 32], max_batch_size=8)
    with pytest.raises(ValueError, match="mps"):
        choose_providers("mps", gpu, input_size=[3, 32, 32], max_batch_size=8)
    device, providers = choose_providers("cuda:1", gpu, input_size=[3, 32, 32], max_batch_size=64)
    assert device == torch.device("cuda", 1)
    (trt, trt_options), (cuda, cuda_options), cpu = providers
    assert (trt, cuda, cpu) == (TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER)
    assert trt_options["device_id"] == cuda_options["device_id"] == 1
    assert trt_options["trt_profile_max_shapes"] == "images:64x3x32x32"
    device, providers = choose_providers("auto", [CUDA_PROVIDER, CPU_PROVIDER], input_size=[3, 32, 32],
                                         max_batch_size=8)
    assert device == torch.device("cuda", 0) and [p[0] if isinstance(p, tuple) else p for p in providers] == [
        CUDA_PROVIDER, CPU_PROVIDER]


# -- both engines behind the real server ---------------------------------------------------------------------
def _settings(model_dir: Path, engine: str) -> Settings:
    return Settings(model=str(model_dir), device="cpu", engine=engine, max_batch_size=32, max_wait=0.0,
                    allow_policy_override=True, request_deadline=60)


@pytest.fixture(scope="module")
def torch_server(model_dir: Path) -> Iterator[LiveServer]:
    yield from serve(create_app(_settings(model_dir, "torch"), registry=_registry()))


@pytest.fixture(scope="module")
def onnx_server(model_dir: Path) -> Iterator[LiveServer]:
    yield from serve(create_app(_settings(model_dir, "onnx"), registry=_registry()))


def _registry() -> Any:
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


def _answer(response: httpx.Response) -> dict[str, Any]:
    """The response without what differs between any two runs: ids and timings."""
    assert response.status_code == 200, response.text
    body = response.json()
    for prediction in body["predictions"]:
        del prediction["batch"]["id"], prediction["batch"]["inference_seconds"]
    return {"model": body["model"], "version": body["version"], "predictions": body["predictions"]}


def test_the_service_answers_identically_with_either_engine(torch_server: LiveServer, onnx_server: LiveServer,
                                                            cifar_samples: list[Sample]) -> None:
    requests: list[tuple[int, str | None]] = [(1, None), (3, None), (MIN_BATCH - 1, None), (MIN_BATCH, None),
                                              (12, None), (2, "frozen"), (5, "batch"), (4, "blend:4"),
                                              (MIN_BATCH - 1, f"adaptive:{MIN_BATCH}:blend:2")]
    start = 0
    for count, policy in requests:  # one request at a time: each is a batch of its own on both servers
        samples = cifar_samples[start:start + count]
        start += count
        files = [("image", (f"{i}.jpg", sample.jpeg, "image/jpeg")) for i, sample in enumerate(samples)]
        params = {"policy": policy, "top_k": 3} if policy else {"top_k": 3}
        answers = [_answer(httpx.post(f"{server.url}/predict", files=files, params=params, timeout=60))
                   for server in (torch_server, onnx_server)]
        assert {p["batch"]["size"] for p in answers[0]["predictions"]} == {count}
        assert_same(answers[0], answers[1], f"{count} images, policy {policy}")
    cards = [httpx.get(f"{server.url}/v1/model").json() for server in (torch_server, onnx_server)]
    assert cards[0] == cards[1]
    stats = [httpx.get(f"{server.url}/v1/stats").json() for server in (torch_server, onnx_server)]
    assert_same(stats[0]["latest"]["layers"], stats[1]["latest"]["layers"], "latest drift")


def test_the_server_gives_pytorch_one_thread_beside_onnx_runtime(engines: tuple[TorchEngine, OnnxEngine]) -> None:
    torch_engine, onnx_engine = engines
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        settle_torch_threads(torch_engine)
        assert torch.get_num_threads() == 2, "PyTorch's threads are the PyTorch engine's to use"
        settle_torch_threads(onnx_engine)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
