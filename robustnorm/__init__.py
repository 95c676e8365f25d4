"""robustnorm: normalization layers that adapt to the traffic they see, and the tools around them.

Importable with torch, numpy and safetensors alone. The public names below are imported on first use
(PEP 562), so that ``import robustnorm`` and the command line's ``--help`` do not load torch before
something needs it. ``docs/library-api.md`` lists the public surface and ``docs/architecture.md`` the
vocabulary (policies, grouped statistics, drift).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# submodule -> the public names it defines
_EXPORTS = {
    "drift": ("MEASURES", "DriftCalibration", "DriftReport", "calibrate_drift", "drift_report", "image_scores",
              "layer_drift"),
    "grouping": ("GroupRun", "batch_groups"),
    "io": ("DEFAULT_MODEL", "ModelCard", "ModelLoadError", "build_model", "list_models", "load_external",
           "load_model", "read_card", "save_model"),
    "layers": ("AdaptiveBatchNorm2d", "GroupStatistics", "RobustNorm2d", "convert_norms", "enable_sync",
               "policy_layers", "set_policy"),
    "models": ("create_model", "create_norm", "get_norm_layer", "list_architectures", "list_norms"),
    "policy": ("GroupPlan", "Policy", "parse_policy"),
    "gate": ("GateCalibration",),
    "stream": ("Stream", "StreamSelection", "StreamStore"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "DEFAULT_MODEL",
    "MEASURES",
    "AdaptiveBatchNorm2d",
    "DriftCalibration",
    "DriftReport",
    "GateCalibration",
    "GroupPlan",
    "GroupRun",
    "GroupStatistics",
    "ModelCard",
    "ModelLoadError",
    "Policy",
    "RobustNorm2d",
    "Stream",
    "StreamSelection",
    "StreamStore",
    "batch_groups",
    "build_model",
    "calibrate_drift",
    "convert_norms",
    "create_model",
    "create_norm",
    "drift_report",
    "enable_sync",
    "get_norm_layer",
    "image_scores",
    "layer_drift",
    "list_architectures",
    "list_models",
    "list_norms",
    "load_external",
    "load_model",
    "parse_policy",
    "policy_layers",
    "read_card",
    "save_model",
    "set_policy",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups find it without calling this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
