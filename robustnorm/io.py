"""Model cards, saving and loading: weights as safetensors beside a JSON card. No pickle anywhere.

A saved model is a directory with ``model.safetensors`` and ``card.json``. The card records what is needed to
rebuild and serve the model (architecture, norm kind and p, labels, input size, mean/std, one canonical
policy string and the drift calibration) and the SHA-256 of the weights file; the model's ``version`` is the
first 12 hex digits of that hash. ``load_model`` refuses a card that does not match its weights.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .data import CIFAR10_MEAN, CIFAR10_STD
from .drift import DriftCalibration
from .layers import RobustNorm2d, convert_norms, policy_layers, set_policy
from .models import create_model, list_architectures, list_norms
from .policy import parse_policy

CARD_FORMAT = "robustnorm-card/1"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
BUNDLED_DIR = Path(__file__).parent / "bundled"
DEFAULT_MODEL = "cifar10-resnet20-robustnorm"


class ModelLoadError(ValueError):
    """A model directory, card or weights file that cannot be loaded as asked."""


@dataclass
class ModelCard:
    """Everything needed to rebuild, serve and interpret a model, stored as JSON beside its weights."""

    name: str
    architecture: str
    norm: str
    labels: list[str]
    input_size: list[int] = field(default_factory=lambda: [3, 32, 32])
    mean: list[float] = field(default_factory=lambda: list(CIFAR10_MEAN))
    std: list[float] = field(default_factory=lambda: list(CIFAR10_STD))
    policy: str = "frozen"
    p: float | None = None
    calibration: DriftCalibration | None = None
    weights_sha256: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def version(self) -> str:
        return (self.weights_sha256 or "unsaved")[:12]

    def validate(self) -> None:
        """Fail fast, with what to fix, on a card that cannot describe a servable model."""
        problems = []
        if not self.labels:
            problems.append("labels must list at least one class")
        if len(self.input_size) != 3 or any(int(v) < 1 for v in self.input_size):
            problems.append(f"input_size must be [channels, height, width], got {self.input_size}")
        channels = self.input_size[0] if self.input_size else 0
        if len(self.mean) != channels or len(self.std) != channels:
            problems.append(f"mean and std need one value per input channel ({channels})")
        if any(not (isinstance(s, (int, float)) and s > 0 and math.isfinite(s)) for s in self.std):
            problems.append("std values must be finite and > 0")
        if self.norm not in list_norms():
            problems.append(f"norm must be one of {list_norms()}, got {self.norm!r}")
        if self.norm == "robustnorm" and (self.p is None or not self.p > 0):
            problems.append("a RobustNorm model card must record p > 0")
        try:
            self.policy = str(parse_policy(self.policy))
        except (ValueError, TypeError) as error:
            problems.append(str(error))
        if problems:
            raise ModelLoadError(f"invalid model card {self.name!r}: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CARD_FORMAT, "name": self.name, "version": self.version,
            "architecture": self.architecture, "norm": self.norm, "p": self.p, "num_classes": self.num_classes,
            "labels": self.labels, "input_size": self.input_size, "mean": self.mean, "std": self.std,
            "policy": self.policy,
            "calibration": self.calibration.to_dict() if self.calibration is not None else None,
            "weights_sha256": self.weights_sha256, "training": self.training, "evaluation": self.evaluation,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        if data.get("format", CARD_FORMAT) != CARD_FORMAT:
            raise ModelLoadError(f"unsupported card format {data.get('format')!r}; expected {CARD_FORMAT!r}")
        known = {"name", "architecture", "norm", "labels", "input_size", "mean", "std", "policy", "p",
                 "weights_sha256", "training", "evaluation", "notes"}
        missing = [key for key in ("name", "architecture", "norm", "labels") if key not in data]
        if missing:
            raise ModelLoadError(f"model card lacks required fields {missing}")
        kwargs = {key: data[key] for key in known if key in data}
        calibration = data.get("calibration")
        kwargs["calibration"] = DriftCalibration.from_dict(calibration) if calibration else None
        if "num_classes" in data and int(data["num_classes"]) != len(data["labels"]):
            raise ModelLoadError(f"card says num_classes={data['num_classes']} but lists {len(data['labels'])} labels")
        try:
            return cls(**kwargs)
        except TypeError as error:
            raise ModelLoadError(f"malformed model card: {error}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(model: nn.Module, card: ModelCard, directory: str | Path) -> ModelCard:
    """Write ``model.safetensors`` and ``card.json`` into ``directory``; returns the card with its hash."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    weights = directory / WEIGHTS_FILE
    metadata = {"format": "pt", "card": card.name}
    # safetensors writes its metadata in no fixed order, so the same weights saved again (a recalibration)
    # would get another hash, and so another model version: an identical file is left as it is.
    if not _holds(weights, state, metadata):
        save_file(state, str(weights), metadata=metadata)
    card.weights_sha256 = _sha256(weights)
    (directory / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    return card


def _holds(weights: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    """Whether ``weights`` already holds exactly these tensors (values, dtypes, shapes) and metadata."""
    if not weights.is_file():
        return False
    try:
        with safe_open(str(weights), framework="pt") as stored:
            if stored.metadata() != metadata or set(stored.keys()) != set(state):
                return False
            return all(_identical(stored.get_tensor(key), value) for key, value in state.items())
    except (OSError, SafetensorError):  # unreadable or truncated: write it again
        return False


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def list_models() -> list[str]:
    """Names of the models bundled with the package (directories with a card and weights)."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(path.name for path in BUNDLED_DIR.iterdir()
                  if (path / CARD_FILE).is_file() and (path / WEIGHTS_FILE).is_file())


def model_directory(name_or_path: str | Path) -> Path:
    """The directory holding a bundled model's or a saved model's card and weights."""
    if str(name_or_path) in list_models():
        return BUNDLED_DIR / str(name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.is_file() and path.suffix in (".json", ".safetensors"):
        return path.parent
    raise ModelLoadError(f"no bundled model or model directory named {str(name_or_path)!r}; "
                         f"bundled models are {list_models()}, or pass a directory holding {CARD_FILE} and "
                         f"{WEIGHTS_FILE} (written by robustnorm.save_model)")


def read_card(path: str | Path) -> ModelCard:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"cannot read model card {path}: {error}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"model card {path} must hold a JSON object")
    return ModelCard.from_dict(data)


def _load_weights(model: nn.Module, weights: Path, expected_sha256: str | None, what: str) -> str:
    if not weights.is_file():
        raise ModelLoadError(f"{what}: weights file {weights} not found")
    digest = _sha256(weights)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ModelLoadError(f"{what}: weights {weights} do not match the card (card sha256 "
                             f"{expected_sha256[:12]}..., file {digest[:12]}...); re-save the model or fix the card")
    state = load_file(str(weights))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(key for key in set(own) & set(state) if own[key].shape != state[key].shape)
    if missing or unexpected or mismatched:
        raise ModelLoadError(f"{what}: weights do not fit the architecture in the card "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {mismatched[:5]})")
    model.load_state_dict(state, strict=True)
    return digest


def build_model(card: ModelCard) -> nn.Module:
    """An untrained model of the card's architecture and norm (with RobustNorm's p)."""
    if card.architecture not in list_architectures():
        raise ModelLoadError(f"card architecture {card.architecture!r} is not registered; "
                             f"valid names are {list_architectures()}")
    kwargs = {"p": card.p} if card.norm == "robustnorm" else {}
    return create_model(card.architecture, norm=card.norm, num_classes=card.num_classes, **kwargs)


def _check_norm_kind(model: nn.Module, card: ModelCard) -> None:
    layers = [layer for _, layer in policy_layers(model)]
    robust = [layer for layer in layers if isinstance(layer, RobustNorm2d)]
    if card.norm == "robustnorm" and robust and any(abs(layer.p - float(card.p or 0)) > 1e-12 for layer in robust):
        raise ModelLoadError(f"card records p={card.p} but the layers use p={robust[0].p}")


def load_model(name_or_path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Load a bundled model by name, or a directory written by :func:`save_model`, in eval mode.

    The card's policy is applied to every norm layer. Raises :class:`ModelLoadError` (a ``ValueError``)
    with what to fix when the card and weights do not match.
    """
    directory = model_directory(name_or_path)
    card = read_card(directory / CARD_FILE)
    model = build_model(card)
    _check_norm_kind(model, card)
    card.weights_sha256 = _load_weights(model, directory / WEIGHTS_FILE, card.weights_sha256, f"model {card.name!r}")
    set_policy(model, card.policy)
    return model.to(device).eval(), card


def load_external(factory: str, weights: str | Path, card_path: str | Path,
                  device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Load any PyTorch model with BatchNorm layers: ``module:factory`` + safetensors weights + a card.

    The factory is called without arguments; its ``nn.BatchNorm2d`` layers are converted with
    :func:`convert_norms`. The card needs ``labels``, ``input_size``, ``mean`` and ``std``; ``norm`` is
    ``bn`` and ``architecture`` records the factory.
    """
    module_name, _, attribute = factory.partition(":")
    if not module_name or not attribute:
        raise ModelLoadError(f"a model factory is written 'module:function', got {factory!r}")
    try:
        builder = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ModelLoadError(f"cannot import model factory {factory!r}: {error}") from None
    try:
        data = json.loads(Path(card_path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"cannot read model card {card_path}: {error}") from None
    data = {"name": attribute, "norm": "bn", **data, "architecture": f"external:{factory}"}
    card = ModelCard.from_dict(data)
    model = convert_norms(builder(), card.policy)
    card.weights_sha256 = _load_weights(model, Path(weights), card.weights_sha256, f"model {factory!r}")
    set_policy(model, card.policy)
    return model.to(device).eval(), card
