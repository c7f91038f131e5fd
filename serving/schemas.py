"""Service configuration and response bodies (pydantic), shared by the app, the docs and the tests.

The config is the ``args`` block of a Ray Serve config file (``serving/config.yaml``), so the same
file drives ``tokenizers-svc serve``, ``serve run`` and ``serve deploy``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tokenizers_svc.errors import ConfigError
from tokenizers_svc.media import MediaLimits


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Autoscaling(_Strict):
    """Passed to Ray Serve's ``autoscaling_config`` (replaces ``num_replicas`` when set)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)


class ModelConfig(_Strict):
    """One tokenizer deployment. Batch size is counted in pixels (H*W*T summed over the batch),
    because one 1024^2 image costs as much as 256 images of 64^2."""

    name: str  # served name: /v1/models/{name}
    model: str | None = None  # preset name or local model directory; default: name
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    device: str = "cpu"  # "cuda" on GPU replicas
    dtype: str = "float32"  # float32 | bfloat16 | float16
    allow_random_init: bool = True  # tiny test presets have no weights; set False in production
    max_batch_size: int = Field(8, ge=1)  # requests per batch
    max_batch_pixels: int = Field(4 * 1024 * 1024, ge=1)  # summed H*W*T per batch; larger items run alone
    batch_wait_timeout_s: float = Field(0.01, ge=0)  # how long the first request waits for company
    max_ongoing_requests: int | None = Field(None, ge=1)  # default: 2 * max_batch_size (one batch + next)
    max_queued_requests: int = Field(64, ge=1)  # beyond this the handle refuses -> 503
    request_timeout_s: float | None = Field(None, gt=0)  # overrides the service's request_timeout_s
    autoscaling: Autoscaling | None = None

    @property
    def source(self) -> str:
        return self.model or self.name

    @property
    def ongoing(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size


class LimitsConfig(_Strict):
    """Caps checked before work is done; exceeding one answers 413 (size) or 422 (shape)."""

    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1)  # checked in ASGI middleware, chunked too
    max_pixels: int = Field(16_000_000, ge=1)  # H*W of one image or frame
    max_frames: int = Field(512, ge=1)
    max_duration_s: float = Field(120.0, gt=0)
    max_total_pixels: int = Field(256_000_000, ge=1)  # T*H*W of one video
    max_latent_elements: int = Field(64_000_000, ge=1)  # N*C*T*h*w of a latent tensor to decode

    def media(self) -> MediaLimits:
        return MediaLimits(
            max_pixels=self.max_pixels,
            max_frames=self.max_frames,
            max_duration_s=self.max_duration_s,
            max_total_pixels=self.max_total_pixels,
        )


class ServiceConfig(_Strict):
    models: list[ModelConfig]
    limits: LimitsConfig = LimitsConfig()
    request_timeout_s: float = Field(60.0, gt=0)  # end-to-end per request -> 504
    retry_after_s: int = Field(1, ge=0)  # Retry-After sent with 503
    api_key_env: str | None = "TOKENIZERS_SVC_API_KEY"  # env var holding the key; unset -> no auth
    default_fps: float = Field(24.0, gt=0)  # mp4 output of bare video tensors (no fps metadata)

    @model_validator(mode="after")
    def _unique_names(self) -> ServiceConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"models must be a non-empty list of unique names, got {names}")
        return self


def parse_config(args: dict) -> ServiceConfig:
    """dict (YAML ``args``) -> ServiceConfig; wrong keys or types raise ConfigError before any work."""
    try:
        return ServiceConfig.model_validate(args)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise ConfigError(
            f"invalid service config at '{where}': {first['msg']} (got {first.get('input')!r})", param=where
        ) from None


class ErrorBody(BaseModel):
    type: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    """Every non-2xx answer: ``{"error": {"type", "message", "param"}}`` plus an X-Request-ID header."""

    error: ErrorBody


class ModelInfo(BaseModel):
    """What a caller needs to use a model: compression, channels, constraints, normalization, dtype."""

    model_config = ConfigDict(extra="allow")

    name: str
    family: str
    modality: str
    spatial_compression: int
    latent_channels: int
    dtype: str


class ModelList(BaseModel):
    models: list[ModelInfo]
