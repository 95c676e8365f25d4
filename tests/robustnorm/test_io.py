"""Saving and loading: safetensors + JSON card round trip, clear refusals of mismatched cards or weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import robustnorm
from robustnorm import ModelCard, ModelLoadError, batch_groups, create_model, load_model, save_model
from robustnorm.data import CIFAR10_CLASSES


def make_card(**overrides: object) -> ModelCard:
    fields = {"name": "test-model", "architecture": "resnet20", "norm": "robustnorm", "p": 0.5,
              "labels": list(CIFAR10_CLASSES), "policy": "adaptive:8"}
    fields.update(overrides)
    return ModelCard(**fields)


def saved(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = create_model("resnet20", norm="robustnorm", p=0.5).train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    save_model(model.eval(), make_card(), tmp_path / "m")
    return model, tmp_path / "m"


def test_round_trip_keeps_outputs_policy_and_version(tmp_path: Path) -> None:
    model, directory = saved(tmp_path)
    assert sorted(p.name for p in directory.iterdir()) == ["card.json", "model.safetensors"]
    loaded, card = load_model(directory)
    assert not loaded.training
    assert card.policy == "adaptive:8" and card.p == 0.5 and len(card.version) == 12
    assert all(str(layer.policy) == "adaptive:8" for _, layer in robustnorm.policy_layers(loaded))
    x = torch.randn(10, 3, 32, 32)
    robustnorm.set_policy(model, "adaptive:8")
    with torch.no_grad():
        for sizes in ([10], [3, 7]):
            with batch_groups(model, sizes):
                expected = model(x)
            with batch_groups(loaded, sizes):
                assert torch.equal(loaded(x), expected)
    # the same card loads through its JSON path as well
    assert load_model(directory / "card.json")[1].version == card.version


def test_saving_the_same_weights_again_keeps_the_version(tmp_path: Path) -> None:
    model, directory = saved(tmp_path)
    first = load_model(directory)[1].version
    weights = (directory / "model.safetensors").read_bytes()
    # a recalibration saves the same weights with a new card: same file, same version
    assert save_model(model, make_card(policy="frozen"), directory).version == first
    assert (directory / "model.safetensors").read_bytes() == weights
    assert load_model(directory)[1].policy == "frozen"
    with torch.no_grad():
        model.fc.bias.add_(1e-3)
    assert save_model(model, make_card(), directory).version != first  # other weights: another version
    (directory / "model.safetensors").write_bytes(weights[:100])  # a truncated file is written again
    assert save_model(model, make_card(), directory).version == load_model(directory)[1].version


def test_card_json_holds_the_documented_fields(tmp_path: Path) -> None:
    _, directory = saved(tmp_path)
    data = json.loads((directory / "card.json").read_text())
    for key in ("architecture", "norm", "p", "labels", "input_size", "mean", "std", "policy", "calibration",
                "weights_sha256", "version"):
        assert key in data
    assert data["version"] == data["weights_sha256"][:12]


def test_refuses_weights_that_do_not_match_the_card_hash(tmp_path: Path) -> None:
    _, directory = saved(tmp_path)
    other = create_model("resnet20", norm="robustnorm", p=0.5)
    save_model(other, make_card(), tmp_path / "other")
    (directory / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match="do not match the card"):
        load_model(directory)


def test_refuses_a_card_for_another_architecture(tmp_path: Path) -> None:
    _, directory = saved(tmp_path)
    data = json.loads((directory / "card.json").read_text())
    data.update(architecture="resnet32", weights_sha256=None)
    (directory / "card.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="do not fit the architecture"):
        load_model(directory)


@pytest.mark.parametrize("change, message", [
    ({"labels": []}, "labels"), ({"norm": "layernorm"}, "norm must be one of"),
    ({"policy": "sometimes"}, "valid forms"),
    ({"mean": [0.5]}, "one value per input channel"), ({"p": None}, "must record p"),
])
def test_refuses_invalid_cards(tmp_path: Path, change: dict, message: str) -> None:
    _, directory = saved(tmp_path)
    data = json.loads((directory / "card.json").read_text())
    data.update(change)
    (directory / "card.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match=message):
        load_model(directory)


def test_unknown_name_lists_bundled_models() -> None:
    with pytest.raises(ModelLoadError, match="bundled models are"):
        load_model("no-such-model")


def test_load_external_module_factory(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    module = tmp_path / "external_net.py"
    module.write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(4, 2))\n")
    import sys
    sys.path.insert(0, str(tmp_path))
    try:
        import external_net

        original = external_net.build().eval()
        save_file(original.state_dict(), str(tmp_path / "w.safetensors"))
        (tmp_path / "card.json").write_text(json.dumps({"labels": ["a", "b"], "input_size": [3, 8, 8],
                                                        "mean": [0.5] * 3, "std": [0.25] * 3}))
        model, card = robustnorm.load_external("external_net:build", tmp_path / "w.safetensors",
                                               tmp_path / "card.json")
        assert card.architecture == "external:external_net:build" and card.norm == "bn"
        x = torch.randn(3, 3, 8, 8)
        with torch.no_grad():
            assert torch.equal(model(x), original(x))
        with pytest.raises(ModelLoadError, match="cannot import"):
            robustnorm.load_external("external_net:nothing", tmp_path / "w.safetensors", tmp_path / "card.json")
    finally:
        sys.path.remove(str(tmp_path))
