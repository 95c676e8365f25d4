"""robustnorm: normalization layers that adapt to the traffic they see, and the tools around them.

Importable with torch, numpy and safetensors alone. See ``docs/library-api.md`` for the public surface and
ARCHITECTURE.md for the vocabulary (policies, grouped statistics, drift).
"""

from .drift import MEASURES, DriftCalibration, DriftReport, calibrate_drift, drift_report, layer_drift
from .grouping import GroupRun, batch_groups
from .io import (
    DEFAULT_MODEL,
    ModelCard,
    ModelLoadError,
    build_model,
    list_models,
    load_external,
    load_model,
    read_card,
    save_model,
)
from .layers import (
    AdaptiveBatchNorm2d,
    GroupStatistics,
    RobustNorm2d,
    convert_norms,
    enable_sync,
    policy_layers,
    set_policy,
)
from .models import create_model, create_norm, get_norm_layer, list_architectures, list_norms
from .policy import Policy, parse_policy

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "MEASURES",
    "AdaptiveBatchNorm2d",
    "DriftCalibration",
    "DriftReport",
    "GroupRun",
    "GroupStatistics",
    "ModelCard",
    "ModelLoadError",
    "Policy",
    "RobustNorm2d",
    "batch_groups",
    "build_model",
    "calibrate_drift",
    "convert_norms",
    "create_model",
    "create_norm",
    "drift_report",
    "enable_sync",
    "get_norm_layer",
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
