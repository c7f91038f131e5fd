"""Service configuration, request parameters and response bodies (pydantic), shared by the app,
the docs and the tests.

The config is the ``args`` block of a Ray Serve config file (``serving/config.yaml``), so the same
file drives ``tokenizers-svc serve``, ``serve run`` and ``serve deploy``. The request parameter
models are the routes' query parameters: each is declared once here, with its description (the
OpenAPI page shows them), and turned into the library's option types by one ``to_options()``
whose defaults are those types' own. The encode options' defaults and descriptions come from their
one definition, ``tokenizers_svc.options`` (the CLI and the batch job declare theirs from it too).
"""

from __future__ import annotations

import difflib
from typing import Literal, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tokenizers_svc.errors import ConfigError, InvalidRequestError
from tokenizers_svc.formats import MAX_FPS, MIN_FPS
from tokenizers_svc.limits import Limits
from tokenizers_svc.options import MAX_SEED, ResizePolicy, field_doc
from tokenizers_svc.pipeline import DecodeOptions, EncodeOptions
from tokenizers_svc.spec import LatentNormalization
from tokenizers_svc.tiling import TilingOptions, tiling_options

_DECODE = DecodeOptions()
_LIMITS = Limits()


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
    dtype: str = "auto"  # auto (bfloat16 on cuda, float32 on cpu) | float32 | bfloat16 | float16
    allow_random_init: bool = True  # tiny test presets have no weights; set False in production
    max_batch_size: int = Field(8, ge=1)  # requests per batch
    max_batch_pixels: int = Field(4 * 1024 * 1024, ge=1)  # summed H*W*T per batch; larger items run alone
    batch_wait_timeout_s: float = Field(0.01, ge=0)  # how long the first request waits for company
    max_ongoing_requests: int | None = Field(None, ge=1)  # default: 2 * max_batch_size (one batch + next)
    max_queued_requests: int = Field(64, ge=1)  # beyond this the handle refuses -> 503
    request_timeout_s: float | None = Field(None, gt=0)  # overrides the service's request_timeout_s
    autoscaling: Autoscaling | None = None
    # Serve the model inside the ingress's process: one actor hop less per request (the proxy's
    # only), no process of its own (several small models share one); it scales with the ingress.
    in_ingress: bool = False

    @model_validator(mode="after")
    def _in_ingress_scales_with_it(self) -> ModelConfig:
        if self.in_ingress and (self.num_replicas != 1 or self.autoscaling is not None):
            raise ValueError(
                f"model {self.name!r}: in_ingress models run in the ingress's replica and scale with it; "
                "num_replicas and autoscaling need in_ingress: false"
            )
        return self

    @property
    def source(self) -> str:
        return self.model or self.name

    @property
    def ongoing(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size


class LimitsConfig(_Strict):
    """Caps checked before work is done (``tokenizers_svc.limits``, the CLI's and the batch job's
    defaults too); exceeding one answers 413 naming the number that was over."""

    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1)  # checked in ASGI middleware, chunked too
    max_pixels: int = Field(_LIMITS.max_pixels, ge=1)  # H*W of one frame read (after resize) or written
    max_frames: int = Field(_LIMITS.max_frames, ge=1)
    max_duration_s: float = Field(_LIMITS.max_duration_s, gt=0)
    max_total_pixels: int = Field(_LIMITS.max_total_pixels, ge=1)  # T*H*W read or written per item
    max_latent_elements: int = Field(_LIMITS.max_latent_elements, ge=1)  # N*C*T*h*w of latents to decode

    def work(self) -> Limits:
        return Limits(**self.model_dump(exclude={"max_body_bytes"}))


class ServiceConfig(_Strict):
    models: list[ModelConfig]
    limits: LimitsConfig = LimitsConfig()
    request_timeout_s: float = Field(60.0, gt=0)  # end-to-end per request -> 504
    body_timeout_s: float = Field(30.0, gt=0)  # the request body must arrive within this -> 408
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
    normalization: dict = Field(
        description="diffusion-ready latents = (raw - shift - mean[c]) / std[c] * scale (mean/std null "
        "when the model has no per-channel statistics)"
    )
    scaling_constants: dict = Field(
        description="the same under diffusers' names: pass scaling_factor/shift_factor to remote_encode "
        "and remote_decode to get or give diffusion-ready latents; latents_mean/latents_std when per-channel"
    )


class ModelList(BaseModel):
    models: list[ModelInfo]


# ---------------------------------------------------------------------------------------------- request parameters


def check_query(params: type[BaseModel], items: list[tuple[str, str]]) -> None:
    """Refuse (422, naming it) a query parameter that ``params`` does not declare, with the closest
    declared name when one is close (``resoltion`` -> ``resolution``: a typo used to be ignored and
    gave latents of the wrong size), and a single-valued parameter given twice (which value won
    was FastAPI's choice, not the client's); list parameters (``shape``) repeat."""
    seen: set[str] = set()
    for name, _ in items:
        field = params.model_fields.get(name)
        shown = name if len(name) <= 64 else name[:64] + "..."
        if field is None:
            close = difflib.get_close_matches(name, list(params.model_fields), n=1)
            hint = (
                f"did you mean {close[0]!r}?" if close else f"expected one of {sorted(params.model_fields)}"
            )
            raise InvalidRequestError(f"unknown query parameter {shown!r}; {hint}", param=shown)
        if name in seen and get_origin(field.annotation) is not list:
            raise InvalidRequestError(
                f"query parameter {name!r} is given more than once; it takes one value", param=name
            )
        seen.add(name)


class TensorBodyParams(BaseModel):
    """Parameters of a ``tensor/binary`` body."""

    shape: list[str] = Field(
        default_factory=list,
        description="tensor/binary bodies: the tensor's shape, as shape=1&shape=3&... or shape=1,3,...",
    )
    dtype: str | None = Field(
        None,
        description="tensor/binary bodies: element type; pixels uint8, float32, float16 or bfloat16, "
        "latents float32, float16 or bfloat16, token ids int32 (quantized models)",
    )


class ScalingParams(BaseModel):
    """The diffusers remote-VAE scaling: normalized = (raw - shift_factor) * scaling_factor."""

    scaling_factor: float | None = Field(
        None,
        allow_inf_nan=False,
        description="diffusers protocol: scale latents as (raw - shift_factor) * scaling_factor (not 0)",
    )
    shift_factor: float | None = Field(
        None, allow_inf_nan=False, description="diffusers protocol: see scaling_factor"
    )

    @field_validator("scaling_factor")
    @classmethod
    def _nonzero_scale(cls, value: float | None) -> float | None:
        if value == 0:
            raise ValueError("must be a finite number other than 0 (latents are divided by it)")
        return value

    def scaling(self) -> LatentNormalization | None:
        """The protocol's scaling as a normalization, or None when neither factor is given (the
        model's own normalization applies)."""
        if self.scaling_factor is None and self.shift_factor is None:
            return None
        scale = 1.0 if self.scaling_factor is None else self.scaling_factor
        return LatentNormalization(scale=scale, shift=0.0 if self.shift_factor is None else self.shift_factor)


class TilingParams(BaseModel):
    tiling: bool | None = Field(**field_doc("tiling"))
    tile_size: int | None = Field(gt=0, **field_doc("tile_size"))
    tile_overlap: int | None = Field(ge=0, **field_doc("tile_overlap"))
    chunk_frames: int | None = Field(gt=0, **field_doc("chunk_frames"))

    def tiling_options(self) -> TilingOptions | None:
        return tiling_options(self.tiling, self.tile_size, self.tile_overlap, self.chunk_frames)


class DiffusersEncodeParams(TensorBodyParams, ScalingParams):
    """``/diffusers/encode``: diffusers ``remote_encode`` sends only these."""


class EncodeParams(DiffusersEncodeParams, TilingParams):
    """``/encode`` query parameters -> :class:`~tokenizers_svc.pipeline.EncodeOptions`."""

    normalize: bool = Field(**field_doc("normalize"))
    sample: bool = Field(**field_doc("sample"))
    seed: int | None = Field(ge=0, le=MAX_SEED, **field_doc("seed"))
    return_posterior: bool = Field(**field_doc("return_posterior"))
    resize: ResizePolicy = Field(**field_doc("resize"))
    resolution: int | None = Field(gt=0, **field_doc("resolution"))
    max_frames: int | None = Field(gt=0, **field_doc("max_frames"))
    start: float | None = Field(ge=0, allow_inf_nan=False, **field_doc("start"))
    end: float | None = Field(gt=0, allow_inf_nan=False, **field_doc("end"))
    stride: int = Field(gt=0, **field_doc("stride"))
    tokens: bool = Field(**field_doc("tokens"))

    def to_options(self) -> EncodeOptions:
        return EncodeOptions.from_flags(self.model_dump())


class DiffusersDecodeParams(ScalingParams):
    """The diffusers ``remote_decode`` parameters, so that client works against ``/decode`` unchanged."""

    output_type: Literal["pil", "pt", "mp4"] | None = Field(
        None, description="diffusers protocol: pil (image bytes, or float [0, 1] tensor), pt or mp4"
    )
    image_format: Literal["png", "jpg"] = Field(
        "jpg", description="diffusers protocol: output_type=pil format"
    )
    partial_postprocess: bool = Field(
        False, description="diffusers protocol: output_type=pt as uint8 channels-last"
    )
    do_scaling: bool | None = Field(
        None, description="diffusers protocol: the latents are normalized by the model's own constants"
    )
    height: int | None = Field(None, gt=0, description="diffusers protocol: image height of packed latents")
    width: int | None = Field(None, gt=0, description="diffusers protocol: image width of packed latents")


class DecodeParams(TensorBodyParams, TilingParams, DiffusersDecodeParams):
    """``/decode`` query parameters -> :class:`~tokenizers_svc.pipeline.DecodeOptions`."""

    format: Literal["png", "jpeg", "jpg", "webp", "mp4", "tensor"] | None = Field(
        None, description="output; default from Accept, else png for images and mp4 for videos"
    )
    normalized: bool = Field(True, description="tensor/binary bodies: the latents are normalized")
    fps: float | None = Field(
        _DECODE.fps, ge=MIN_FPS, le=MAX_FPS, description="mp4 output; default: the latent file's fps"
    )
    quality: int = Field(_DECODE.quality, ge=1, le=100, description="JPEG/WebP quality")

    def to_options(self) -> DecodeOptions:
        return DecodeOptions(fps=self.fps, quality=self.quality, tiling=self.tiling_options())
