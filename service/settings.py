"""Service settings: one pydantic-settings class, validated when the service starts.

Every field can be set, from highest to lowest precedence, by a ``robustnorm-serve`` flag (``--max-batch-size``),
an environment variable (``ROBUSTNORM_MAX_BATCH_SIZE``), an optional TOML or JSON config file
(``--config-file`` or ``ROBUSTNORM_CONFIG_FILE``) and the default. The statistics policy follows the same
order and falls back to the model card's policy when none of them sets it (flag > environment > card).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

import robustnorm

ENV_PREFIX = "ROBUSTNORM_"
CONFIG_FILE_ENV = f"{ENV_PREFIX}CONFIG_FILE"
MiB = 1024 * 1024

_FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")

BatchKeySource = Literal["none", "api_key", "header"]
StreamKey = Literal["client", "shared"]
Isolation = Literal["separate", "grouped"]
Padding = Literal["auto", "on", "off"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
EngineKind = Literal["auto", "torch", "onnx"]


def is_factory_spec(model: str) -> bool:
    """Whether ``model`` names a ``module:factory`` (as opposed to a bundled name or a directory)."""
    return bool(_FACTORY_SPEC.match(model)) and not Path(model).exists()


class Settings(BaseSettings):
    """Everything the service can be configured with. Invalid values fail at start-up, with what to fix."""

    # An empty variable (ROBUSTNORM_POLICY= in a compose file) means "not set", not an empty value.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="forbid", frozen=True,
                                      protected_namespaces=())

    # -- the model -------------------------------------------------------------------------------------
    model: str | None = Field(
        None,
        description="a bundled model name, a directory written by robustnorm.save_model, or 'module:factory' "
                    "for any PyTorch model with BatchNorm layers (then also --weights and --card); "
                    "default: the bundled default model")
    weights: Path | None = Field(None, description="safetensors weights for a 'module:factory' model")
    card: Path | None = Field(
        None, description="card JSON for a 'module:factory' model: labels, input_size, mean, std (policy optional)")
    device: str = Field("auto", description="'auto' (the GPU when there is one, else the CPU), 'cpu', 'cuda[:N]'")
    engine: EngineKind = Field(
        "auto", description="'auto': ONNX Runtime on the CPU where onnxruntime is installed (faster there), else "
                            "PyTorch; 'torch' (PyTorch) or 'onnx' (ONNX Runtime: TensorRT/CUDA providers on a GPU, "
                            "else the CPU; the model is exported at start-up, or MODEL is a .onnx file from "
                            "robustnorm export)")
    policy: str | None = Field(
        None, description="statistics policy overriding the model card's, e.g. 'adaptive:16' or 'blend:16'")
    allow_policy_override: bool = Field(
        False, description="let a request choose its own policy (?policy=...); such requests batch separately")

    # -- batching --------------------------------------------------------------------------------------
    max_batch_size: int = Field(32, ge=1, le=4096, description="images per micro-batch at most")
    max_wait: float = Field(0.01, ge=0, le=10, description="seconds the oldest queued request waits for a batch "
                                                           "to fill (with eager_batches, only while admitted "
                                                           "requests are on their way to the queue, or while the "
                                                           "clients of the batch that just ended may send again)")
    eager_batches: bool = Field(
        True, description="a batch leaves as soon as the engine is free, with whatever is queued: batches grow "
                          "with the load while the engine is busy, and an idle engine answers at once (unless "
                          "admitted requests are still on their way to the queue, or the batch that just ended "
                          "held at least a quarter of max_batch_size and more images than are queued: then it "
                          "waits for them, at most max_wait)")
    queue_limit: int = Field(512, ge=1, description="images waiting at most; beyond it requests get 429")
    request_deadline: float = Field(
        10.0, gt=0, description="seconds a request may take end to end, counted from its first byte (or from "
                                "X-Request-Start with trust_request_start); work that cannot be answered in time "
                                "is refused (429) or dropped (504), never answered late")
    trust_request_start: bool = Field(
        False, description="count deadlines from the X-Request-Start header ('t=<seconds>' or 't=<microseconds>' "
                           "since the epoch) a trusted proxy in front sets, so that time queued there counts; "
                           "only behind such a proxy: clients could otherwise set it")
    max_active_requests: int = Field(
        256, ge=1, description="requests being answered at once at most (their bodies in, decoding, queued or "
                              "running); beyond it "
                              "/predict answers 429 at once. Every request takes turns on one event loop, so this "
                              "keeps admitted requests fast under overload")
    tenant_queue_share: float = Field(
        0.5, gt=0, le=1, description="share of queue_limit (and of max_active_requests) one tenant may hold while "
                                     "other tenants are active (tenants as batch_key names them); beyond it, its "
                                     "requests get 429")
    tenant_rate: float | None = Field(
        None, gt=0, description="requests per second one tenant (as batch_key names it) is admitted at most, in "
                                "bursts of up to a tenth of a second's worth; beyond it its requests get 429 "
                                "'tenant_rate'. Unset: no quota (tenant_queue_share still applies). The same "
                                "quota the shipped HAProxy applies in front of the replicas")
    pad_batches: Padding = Field(
        "auto", description="pad batches to powers of two up to max_batch_size ('auto': only on CUDA)")
    batch_key: BatchKeySource = Field(
        "none", description="keep tenants out of each other's batches: 'none', 'api_key' or 'header'")
    tenant_header: str = Field("X-Tenant", description="request header naming the tenant when batch_key='header'")
    isolation: Isolation = Field(
        "separate", description="'separate' batches per tenant, or 'grouped': tenants share a forward pass "
                                "but each tenant's images are normalised with their own statistics")
    api_keys: dict[str, str] = Field(
        default_factory=dict, repr=False,
        description="API key -> tenant name (JSON); when set, /predict requires a key (X-API-Key or Bearer)")

    admin_keys: dict[str, str] = Field(
        default_factory=dict, repr=False,
        description="admin key -> admin name (JSON); admin routes (POST /v1/streams/reset) exist only when set; "
                    "an admin key also reads /metrics and every tenant's statistics")
    metrics_keys: dict[str, str] = Field(
        default_factory=dict, repr=False,
        description="scraper key -> scraper name (JSON); such a key reads /metrics and nothing else; when set, "
                    "/metrics needs an admin or a scraper key")

    # -- stream statistics (policies 'stream' and 'auto') -------------------------------------------------------
    max_streams: int = Field(256, ge=1, description="streams held at most; the least recently used is dropped")
    stream_idle_seconds: float = Field(3600.0, gt=0, description="seconds after which an idle stream is dropped")
    stream_batch_share: float = Field(
        0.25, gt=0, le=1, description="share of a stream's window one micro-batch may fill at most (bounds how far "
                                      "one batch moves the statistics later batches run with)")

    stream_key: StreamKey = Field(
        "client", description="whose images share a stream when batch_key is 'none': 'client' gives each client "
                              "address its own stream, so that no client's images move the statistics another "
                              "client's images run with; 'shared' makes all traffic one stream (it fills faster, "
                              "but every client moves every answer). With a batch_key each tenant has its own "
                              "stream either way")
    trust_forwarded_for: bool = Field(
        False, description="take the client address (stream_key='client') from the last X-Forwarded-For entry, "
                           "which a trusted proxy in front appends; only behind such a proxy: clients could "
                           "otherwise choose their stream")

    stream_trim: float = Field(
        0.0, ge=0, lt=0.5, description="share of a stream window's images left out at each end, per channel, of its "
                                       "statistics and of its gate score (0: none): bounds what a minority of "
                                       "outlying or crafted images can do to a shared stream")

    drift_metrics: str = Field(
        "after", description="when batches' per-layer drift and batch scores are computed for metrics and /v1/stats: "
                             "'after' the answers leave (on a thread of its own; the response's batch drift_score "
                             "is null), 'inline' before (the response carries it), 'sampled:F' after, for a "
                             "fraction F of batches, or 'off'. Image drift scores and the statistics the policy "
                             "and its gate need are computed in every forward whatever this says")
    drift_max_rate: float = Field(
        10.0, ge=0, description="batches scored for metrics per second at most, in the modes that score after the "
                                "answers (0: no limit). Every batch is scored below that rate; above it, as many as "
                                "the rate allows, so that monitoring takes a bounded share of a saturated CPU")

    # -- inputs ----------------------------------------------------------------------------------------
    max_image_bytes: int = Field(8 * MiB, ge=1, description="bytes per encoded image at most")
    max_image_pixels: int = Field(
        25_000_000, ge=1, description="pixels (width x height) per image at most, checked before decoding")
    max_images_per_request: int = Field(64, ge=1, description="images per request at most")
    max_request_pixels: int = Field(
        50_000_000, ge=1, description="pixels over all images of a request at most, checked before decoding "
                                      "(bounds the decoding time one request can take from others)")
    max_request_bytes: int = Field(32 * MiB, ge=1, description="bytes per request body at most")
    default_top_k: int = Field(5, ge=1, description="classes listed per image unless the request asks (?top_k=)")
    decode_workers: int = Field(
        default_factory=lambda: min(4, os.cpu_count() or 1), ge=1, description="threads decoding images")

    # -- the server ------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    log_level: LogLevel = Field("info", description="logging level")
    access_log: bool = Field(False, description="log every HTTP request (uvicorn's access log); requests are "
                                                "counted in the metrics either way")
    gc_threshold: int = Field(
        10_000, ge=0, description="allocations between two collections of Python's youngest garbage generation "
                                  "(Python's own default: 700), with everything alive at start-up (the model, the "
                                  "libraries) frozen out of the collector's sight; 0 leaves the collector as Python "
                                  "sets it. Collections that walk the whole heap stall the event loop and the "
                                  "engine for milliseconds under load")
    switch_interval: float = Field(
        0.0005, gt=0, le=0.1,
        description="seconds a thread may keep Python's interpreter while another waits for it (sys.setswitchinterval; "
                    "Python's default: 0.005). The engine's thread lets the interpreter go for each tensor operation "
                    "and must take it back from the event loop's thread after each one: under load, at Python's "
                    "default, it may wait up to 5 ms each time the loop is busy (docs/overload.md)")
    drain_timeout: float = Field(
        10.0, ge=0, description="seconds from SIGTERM (or Ctrl+C) to exit at most: the grace period, then the "
                                "requests already accepted are finished")
    drain_grace: float = Field(
        5.0, ge=0, description="seconds after SIGTERM the service keeps listening (at most drain_timeout): /readyz "
                               "and new requests answer 503 with Connection: close, so that load balancers move "
                               "away, while requests already accepted are answered")
    header_timeout: float = Field(
        5.0, gt=0, description="seconds a client may take to send a request's headers, from connecting or from the "
                               "first byte of a request on a kept-alive connection; the connection is closed after")
    body_timeout: float = Field(
        5.0, gt=0, description="seconds a request body may take to arrive, counted from the request's first byte "
                               "(408 after; the request deadline counts from the first byte too)")
    keep_alive_timeout: float = Field(5.0, gt=0, description="seconds an idle kept-alive connection stays open")
    max_uploads: int = Field(
        32, ge=1, description="request bodies arriving at once at most (a body that arrives in one piece takes no "
                              "place); beyond it, 503 with Retry-After. Bounds the memory slow uploads can hold to "
                              "about max_uploads x max_request_bytes")
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, le=1024 * 1024, description="bytes of a request's line and headers at most (431 beyond)")
    config_file: Path | None = Field(None, description="TOML or JSON file with any of these settings")

    @field_validator("policy")
    @classmethod
    def _canonical_policy(cls, value: str | None) -> str | None:
        return None if value is None else str(robustnorm.parse_policy(value))

    @field_validator("drift_metrics")
    @classmethod
    def _drift_metrics(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("after", "inline", "off"):
            return value
        kind, _, fraction = value.partition(":")
        try:
            share = float(fraction)
        except ValueError:
            share = -1.0
        if kind != "sampled" or not 0 < share <= 1:
            raise ValueError(f"drift_metrics must be 'after', 'inline', 'off' or 'sampled:F' with 0 < F <= 1, "
                             f"got {value!r}")
        return f"sampled:{share:g}"

    @property
    def drift_share(self) -> float:
        """The fraction of batches whose drift is scored (1 for 'after' and 'inline', 0 for 'off')."""
        if self.drift_metrics == "off":
            return 0.0
        return float(self.drift_metrics.partition(":")[2]) if self.drift_metrics.startswith("sampled") else 1.0

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE.match(value):
            raise ValueError(f"device must be 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N', got {value!r}")
        return value

    @field_validator("tenant_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not _HEADER_NAME.match(value):
            raise ValueError(f"{value!r} is not a valid HTTP header name")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.is_factory_model:
            if self.weights is None or self.card is None:
                raise ValueError(f"model {self.model!r} is a 'module:factory'; give its weights (safetensors) "
                                 "and card (JSON) too")
        elif self.weights is not None or self.card is not None:
            raise ValueError("weights and card are only for a 'module:factory' model; a bundled model or a "
                             "saved model directory carries its own")
        if self.queue_limit < self.max_images_per_request:
            raise ValueError(f"queue_limit ({self.queue_limit}) must hold at least one full request "
                             f"(max_images_per_request={self.max_images_per_request})")
        if self.max_request_bytes < self.max_image_bytes:
            raise ValueError(f"max_request_bytes ({self.max_request_bytes}) must be at least max_image_bytes "
                             f"({self.max_image_bytes})")
        if self.max_request_pixels < self.max_image_pixels:
            raise ValueError(f"max_request_pixels ({self.max_request_pixels}) must be at least max_image_pixels "
                             f"({self.max_image_pixels})")
        roles = (("API", self.api_keys), ("admin", self.admin_keys), ("metrics", self.metrics_keys))
        for index, (first, first_keys) in enumerate(roles):
            for second, second_keys in roles[index + 1:]:
                if set(first_keys) & set(second_keys):
                    raise ValueError(f"every key has one role, but a key is among both the {first} keys and "
                                     f"the {second} keys")
        if any(not key for _, keys in roles for key in keys):
            raise ValueError("an API, admin or metrics key cannot be empty")
        if self.batch_key == "api_key" and not self.api_keys:
            raise ValueError("batch_key='api_key' needs api_keys (a JSON object of API key -> tenant name)")
        if self.config_file is not None and not self.config_file.is_file():
            raise ValueError(f"config file {self.config_file} does not exist")
        return self

    @property
    def is_factory_model(self) -> bool:
        return self.model is not None and is_factory_spec(self.model)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags (init arguments) > environment > config file > defaults.
        init_kwargs = getattr(init_settings, "init_kwargs", {})
        config_file = init_kwargs.get("config_file") or os.environ.get(CONFIG_FILE_ENV)
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise ValueError(f"config file {path} does not exist")
            if path.suffix.lower() == ".json":
                sources += (JsonConfigSettingsSource(settings_cls, json_file=path),)
            elif path.suffix.lower() == ".toml":
                sources += (TomlConfigSettingsSource(settings_cls, toml_file=path),)
            else:
                raise ValueError(f"config file {path} must be .toml or .json")
        return sources
