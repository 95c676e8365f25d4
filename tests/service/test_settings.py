"""Settings: environment prefix, precedence (flag > environment > config file > default), fail-fast checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, is_factory_spec


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("ROBUSTNORM_"):
            monkeypatch.delenv(name)


def test_defaults_serve_the_bundled_default_model_on_loopback() -> None:
    settings = Settings()
    assert settings.model is None and not settings.is_factory_model  # the bundled default model
    assert (settings.host, settings.port, settings.device) == ("127.0.0.1", 8000, "auto")
    assert settings.policy is None and not settings.allow_policy_override
    assert settings.batch_key == "none"


def test_environment_and_config_file_with_flags_winning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    toml = tmp_path / "serve.toml"
    toml.write_text('max_batch_size = 4\nqueue_limit = 100\npolicy = "frozen"\nport = 9000\n')
    monkeypatch.setenv("ROBUSTNORM_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("ROBUSTNORM_POLICY", "Adaptive:16")
    settings = Settings(config_file=toml)
    assert (settings.max_batch_size, settings.queue_limit, settings.port) == (8, 100, 9000)
    assert settings.policy == "adaptive:16"  # environment over file, in canonical form
    flagged = Settings(config_file=toml, max_batch_size="16", policy="blend:32")
    assert (flagged.max_batch_size, flagged.policy) == (16, "blend:32")


def test_json_config_file_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"max_wait": 0.002, "api_keys": {"s3cret-key": "tenant"}, "batch_key": "api_key"}))
    monkeypatch.setenv("ROBUSTNORM_CONFIG_FILE", str(config))
    settings = Settings()
    assert settings.max_wait == 0.002 and settings.batch_key == "api_key"
    assert "s3cret-key" not in repr(settings)  # API keys stay out of logs
    assert settings.api_keys == {"s3cret-key": "tenant"}


@pytest.mark.parametrize(("overrides", "message"), [
    ({"policy": "sometimes"}, "valid forms"),
    ({"device": "gpu"}, "device"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"queue_limit": 8, "max_images_per_request": 16}, "queue_limit"),
    ({"max_request_bytes": 10, "max_image_bytes": 100}, "max_request_bytes"),
    ({"batch_key": "api_key"}, "api_keys"),
    ({"batch_key": "cookie"}, "batch_key"),
    ({"model": "mypackage.nets:build"}, "weights"),
    ({"weights": "w.safetensors"}, "module:factory"),
    ({"tenant_header": "X Tenant"}, "header"),
    ({"config_file": "/nonexistent/serve.toml"}, "does not exist"),
    ({"max_wait": -1}, "max_wait"),
])
def test_invalid_settings_fail_at_start_up(overrides: dict, message: str) -> None:
    with pytest.raises((ValidationError, ValueError), match=message):
        Settings(**overrides)


def test_factory_specs_are_told_from_names_and_paths(tmp_path: Path) -> None:
    assert is_factory_spec("mypackage.nets:build")
    assert not is_factory_spec("cifar10-resnet20-robustnorm")
    assert not is_factory_spec(str(tmp_path))
    settings = Settings(model="nets:build", weights=tmp_path / "w.safetensors", card=tmp_path / "card.json")
    assert settings.is_factory_model


def test_empty_environment_variables_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBUSTNORM_POLICY", "")  # as a compose file's `ROBUSTNORM_POLICY:` passes it
    monkeypatch.setenv("ROBUSTNORM_MODEL", "")
    settings = Settings()
    assert settings.policy is None and settings.model is None
