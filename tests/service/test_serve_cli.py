"""``robustnorm-serve``: options, fail-fast errors, and a real process serving a ``module:factory`` model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file
from service_support import CIFAR_CLASSES, CIFAR_MEAN, CIFAR_STD, REPO_ROOT, Sample, free_socket, wait_ready

from service.cli import build_parser, main
from service.settings import Settings

TINY_NET = '''
from torch import nn


def build():
    """Any PyTorch model with BatchNorm layers."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
'''


def test_every_setting_is_an_option_except_the_keys() -> None:
    options = {option for action in build_parser()._actions for option in action.option_strings}
    for name in Settings.model_fields:
        assert (f"--{name.replace('_', '-')}" in options) == (name not in ("api_keys", "admin_keys",
                                                                           "metrics_keys")), name
    assert {"--host", "--port", "--model", "--device", "--policy", "--no-allow-policy-override"} <= options
    assert {"--header-timeout", "--body-timeout", "--keep-alive-timeout", "--max-uploads", "--max-header-bytes",
            "--drain-grace", "--drain-timeout"} <= options


def test_help_is_plain_text_and_imports_no_torch() -> None:
    code = ("import sys\nfrom service.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as exited:\n"
            "    assert exited.code == 0\nprint('TORCH IMPORTED' if 'torch' in sys.modules else 'NO TORCH')")
    text = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                          cwd=REPO_ROOT).stdout
    assert text.rstrip().endswith("NO TORCH")
    assert "usage: robustnorm-serve" in text and "--max-batch-size" in text
    assert "``" not in text and ":class:" not in text and ":func:" not in text


def test_invalid_options_exit_with_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--policy", "sometimes"])
    assert exited.value.code == 2
    assert "valid forms" in capsys.readouterr().err


def test_a_model_that_cannot_be_loaded_fails_before_serving(caplog: pytest.LogCaptureFixture) -> None:
    assert main(["--model", "no-such-model", "--device", "cpu"]) == 1
    assert "save_model" in caplog.text


def test_serves_a_module_factory_model_with_flag_over_environment_over_card(
        tmp_path: Path, cifar_samples: list[Sample]) -> None:
    (tmp_path / "tiny_cli_net.py").write_text(textwrap.dedent(TINY_NET))
    sys.path.insert(0, str(tmp_path))
    try:
        import tiny_cli_net

        torch.manual_seed(0)
        save_file(tiny_cli_net.build().state_dict(), str(tmp_path / "weights.safetensors"))
    finally:
        sys.path.remove(str(tmp_path))
    (tmp_path / "card.json").write_text(json.dumps({
        "name": "tiny-cli-net", "labels": list(CIFAR_CLASSES), "input_size": [3, 32, 32], "mean": list(CIFAR_MEAN),
        "std": list(CIFAR_STD), "policy": "adaptive:16"}))
    with free_socket() as sock:
        port = sock.getsockname()[1]
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "ROBUSTNORM_POLICY": "batch",
                   "ROBUSTNORM_MAX_WAIT": "0.001", "ROBUSTNORM_SWITCH_INTERVAL": "0.002"}
    command = [sys.executable, "-m", "service", "--model", "tiny_cli_net:build", "--weights", "weights.safetensors",
               "--card", "card.json", "--device", "cpu", "--port", str(port), "--policy", "adaptive:4",
               "--log-level", "info"]
    process = subprocess.Popen(command, cwd=tmp_path, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, time.monotonic() + 120, lambda: process.poll() is None)
        card = httpx.get(f"{url}/v1/model").json()
        assert (card["name"], card["norm"], card["card_policy"], card["policy"]) == (
            "tiny-cli-net", "bn", "adaptive:16", "adaptive:4")
        assert card["device"] == "cpu" and card["max_batch_size"] == 32
        lone = httpx.post(f"{url}/predict", content=cifar_samples[0].jpeg, headers={"content-type": "image/jpeg"})
        assert lone.status_code == 200, lone.text
        batch = lone.json()["predictions"][0]["batch"]
        assert (batch["size"], batch["policy"], batch["statistics"], batch["fallback"]) == (
            1, "adaptive:4", "blend", True)  # BatchNorm layers fall back to blended statistics
        files = [("image", (f"{i}.png", s.png, "image/png")) for i, s in enumerate(cifar_samples[:4])]
        four = httpx.post(f"{url}/predict", files=files)
        assert {p["batch"]["statistics"] for p in four.json()["predictions"]} == {"batch"}
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises the signal it caught, as process managers expect.
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Traceback" not in output, output
    assert "threads wait at most 2 ms for the interpreter" in output, output  # the process-wide switch interval


def test_settling_the_garbage_collector_freezes_the_heap_and_raises_the_threshold_unless_turned_off() -> None:
    # In a process of its own: freezing the collector is process-wide.
    probe = textwrap.dedent("""
        import gc, json, sys
        from service.cli import settle_garbage_collector
        before = gc.get_threshold()
        off = settle_garbage_collector(0)
        unchanged = gc.get_threshold() == before and gc.get_freeze_count() == 0
        on = settle_garbage_collector(5000)
        print(json.dumps([off, unchanged, on, gc.get_threshold()[0], gc.get_freeze_count()]))
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    off, unchanged, on, threshold, frozen = json.loads(result.stdout)
    assert (off, unchanged, on, threshold) == (False, True, True, 5000)
    assert frozen > 1000  # the modules imported so far
