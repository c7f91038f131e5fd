"""FastAPI ingress: HTTP protocol only (bodies, content negotiation, limits, errors).

Each route parses the request into a job (query parameters: :mod:`serving.schemas`; the diffusers
remote-VAE protocol: :mod:`serving.remote_vae`), hands it to the model's tokenizer deployment, and
turns the reply into a response. Media decoding, batching and the model live in ``serving.worker``.
Request bodies:

- encode: ``image/png|jpeg|webp``, ``video/mp4`` (and other containers PyAV reads), or
  ``tensor/binary`` pixels with ``shape``/``dtype`` query parameters;
- decode: ``application/x-safetensors`` (the latent file) or ``tensor/binary`` latents.
"""

import asyncio
import math
import os
import time
from dataclasses import replace
from typing import Annotated

import torch
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.admission import Admission
from serving.error_response import error_response
from serving.jobs import DecodeJob, EncodeJob, ErrorReply, Reply
from serving.metrics import ServiceMetrics
from serving.middleware import MiddlewareSettings, ServiceMiddleware
from serving.remote_vae import apply_decode_protocol, unpack_latents
from serving.schemas import (
    DecodeParams,
    DiffusersEncodeParams,
    EncodeParams,
    ErrorResponse,
    ModelInfo,
    ModelList,
    ServiceConfig,
    check_query,
)
from serving.threads import ServingThreads
from serving.worker import InProcessModel
from tokenizers_svc import media
from tokenizers_svc.errors import (
    HTTPError,
    InvalidRequestError,
    LimitExceededError,
    OverloadedError,
    RequestTimeoutError,
    ShapeMismatchError,
    TokenizerError,
    UnsupportedMediaTypeError,
    UnsupportedModelError,
)
from tokenizers_svc.limits import Cost
from tokenizers_svc.pipeline import EncodeOptions, check_decode_cost, check_encode_cost, check_media_kind
from tokenizers_svc.spec import ID_DTYPE, FrameRule
from tokenizers_svc.tokens import TokenIds, encoded_from_bytes
from tokenizers_svc.wire import (
    ID_DTYPES,
    LATENT_DTYPES,
    LATENT_FILE_TYPE,
    TENSOR_TYPE,
    parse_shape,
    tensor_from_bytes,
)

IMAGE_ACCEPT = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp", "video/mp4": "mp4"}

_binary = {"schema": {"type": "string", "format": "binary"}}
ENCODE_BODY = {
    "requestBody": {
        "required": True,
        "description": "An image, a video, or raw pixels (tensor/binary: C-order little-endian bytes of a "
        "(1, 3, H, W) or (1, 3, T, H, W) tensor, uint8 [0, 255] or float [-1, 1]; pass shape and dtype).",
        "content": {
            t: _binary
            for t in (
                "image/png",
                "image/jpeg",
                "image/webp",
                "video/mp4",
                "video/webm",
                "video/quicktime",
                TENSOR_TYPE,
            )
        },
    }
}
DECODE_BODY = {
    "requestBody": {
        "required": True,
        "description": "A latent file (safetensors written by encode / Latents.save), a token file "
        "(safetensors written by encode?tokens=true / TokenIds.save: int32 ids and their metadata), raw "
        "latents (tensor/binary: (N, C, h, w) or (N, C, t, h, w) float32/float16/bfloat16), or raw token "
        "ids of a quantized model (tensor/binary: (N, h, w) or (N, t, h, w) int32); pass shape and dtype.",
        "content": {LATENT_FILE_TYPE: _binary, "application/octet-stream": _binary, TENSOR_TYPE: _binary},
    }
}
ENCODE_RESPONSES = {
    200: {
        "description": "The latent file, or raw latents with `shape`/`dtype`/`normalized` headers "
        "when `Accept: tensor/binary`. With `tokens=true` (quantized models): the token file "
        "(int32 ids, vocabulary, levels, crop metadata), or the bare int32 ids (N, [t,] h, w) with "
        "`shape`/`dtype`/`vocabulary-size` headers when `Accept: tensor/binary`.",
        "content": {LATENT_FILE_TYPE: _binary, TENSOR_TYPE: _binary},
    }
}
DECODE_RESPONSES = {
    200: {
        "description": "Decoded media, or raw pixels with `shape`/`dtype` headers for tensor output.",
        "content": {t: _binary for t in ("image/png", "image/jpeg", "image/webp", "video/mp4", TENSOR_TYPE)},
    }
}
MODEL_PARAM = Path(description="A served model name, as listed by GET /v1/models (serving/config.yaml).")
ModelName = Annotated[str, MODEL_PARAM]
METRICS_RESPONSES = {
    200: {
        "description": "Prometheus text exposition format (version 0.0.4).",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}
ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 413, 415, 422, 500, 503, 504)}

app = FastAPI(
    title="tokenizers-svc",
    version="1",
    description="Encode images and videos into latents and decode latents back (see docs/serving.md).",
)
app.add_middleware(ServiceMiddleware)


@app.exception_handler(TokenizerError)
async def _tokenizer_error(request: Request, error: TokenizerError) -> Response:
    return error_response(error)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    first = exc.errors()[0]
    param = str(first["loc"][-1]) if first.get("loc") else None
    got = repr(first.get("input"))
    got = got if len(got) <= 80 else got[:80] + "..."  # a 10 KB value is not echoed whole
    return error_response(InvalidRequestError(f"{param}: {first['msg']} (got {got})", param=param))


def strict_query(params: type) -> Depends:
    """A route dependency: the query holds only ``params``' names, single-valued ones once
    (``schemas.check_query``); it runs before the values are validated."""

    async def check(request: Request) -> None:  # async: FastAPI runs a sync one in a thread pool
        check_query(params, request.query_params.multi_items())

    return Depends(check)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    return error_response(HTTPError(exc.status_code, str(exc.detail)))


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _accepts(request: Request) -> str:
    return request.headers.get("accept", "").split(",")[0].split(";")[0].strip().lower()


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Ingress:
    """Routes requests to one tokenizer deployment per model (``workers``: served name -> handle),
    or to the models it serves itself (``in_ingress``: :class:`~serving.worker.InProcessModel`)."""

    def __init__(self, config: dict, workers: dict) -> None:
        self.config = ServiceConfig.model_validate(config)
        limits = self.config.limits.model_dump()
        local = [m for m in self.config.models if m.in_ingress]
        # one process for the models served here: their calls compute with the CPUs they asked for
        # together, in threads they share (serving/threads.py)
        threads = ServingThreads(int(sum(m.num_cpus for m in local))) if local else None
        self.workers = {  # in the config's order: /v1/models lists them so
            m.name: InProcessModel(m.model_dump(), limits, threads) if m.in_ingress else workers[m.name]
            for m in self.config.models
        }
        self.metrics = ServiceMetrics(m.name for m in self.config.models)
        self.info: dict[str, dict] = {}
        self.limits = self.config.limits.work()
        self.timeouts = {
            m.name: m.request_timeout_s or self.config.request_timeout_s for m in self.config.models
        }
        self.quanta = {m.name: max(1, m.max_batch_pixels // m.max_batch_size) for m in self.config.models}
        self.admission = {
            m.name: Admission(
                m.name,
                self.timeouts[m.name],
                replicas=m.autoscaling.min_replicas if m.autoscaling else m.num_replicas,
                concurrency=m.ongoing,
                retry_after_s=self.config.retry_after_s,
                max_batch_units=m.max_batch_pixels,
            )
            for m in self.config.models
        }
        app.state.middleware = MiddlewareSettings(
            max_body_bytes=self.config.limits.max_body_bytes,
            body_timeout_s=self.config.body_timeout_s,
            api_key=os.environ.get(self.config.api_key_env) if self.config.api_key_env else None,
            metrics=self.metrics,
        )

    # ---- plumbing ----

    def _handle(self, model: str):
        if model not in self.workers:
            raise UnsupportedModelError(
                f"unknown model {model!r}; served: {sorted(self.workers)}", param="model"
            )
        return self.workers[model]

    async def _describe(self, model: str) -> dict:
        if model not in self.info:
            self.info[model] = await self._handle(model).describe.remote()
        return self.info[model]

    async def _call(self, model: str, method: str, job, cost: Cost) -> Response:
        """Send a job to the model's deployment with admission (serving/admission.py), backpressure,
        a deadline the replica abandons the work at, timeout and error mapping."""
        try:
            ticket = self.admission[model].admit(method, max(cost.total_pixels, self.quanta[model]))
        except OverloadedError:
            self.metrics.rejected.labels(model, "cannot_finish_in_time").inc()
            raise
        except LimitExceededError:
            self.metrics.rejected.labels(model, "longer_than_timeout").inc()
            raise
        timeout = self.timeouts[model]
        job.deadline = time.time() + timeout
        if isinstance(job, EncodeJob):
            job.lane = ticket.lane  # the replica decodes its media in that lane's slots
        called = time.perf_counter()
        response = getattr(self._handle(model), method).remote(job)
        gauge = self.metrics.in_flight.labels(model)
        gauge.inc()
        retry = self.config.retry_after_s
        reply: Reply | ErrorReply | None = None
        timed_out = False
        try:
            # not wait_for: on Python 3.11 it wraps a handle's response in a task of its own and
            # wakes this one through a waiter future, work on every request that a timeout avoids
            async with asyncio.timeout(timeout):
                reply = await response
        except BackPressureError:
            self.metrics.rejected.labels(model, "queue_full").inc()
            raise OverloadedError(
                f"{model} queue is full; retry after {retry} s", param="model", retry_after=retry
            ) from None
        except (RayActorError, ActorUnavailableError):
            self.metrics.rejected.labels(model, "replica_unavailable").inc()
            raise OverloadedError(
                f"{model} replica is restarting; retry after {retry} s", param="model", retry_after=retry
            ) from None
        except asyncio.CancelledError:  # the client left: its work is abandoned on the replica too
            response.cancel()
            raise
        except TimeoutError:
            response.cancel()
            timed_out = True  # it needed at least the timeout: the next one like it may be refused
            self.metrics.rejected.labels(model, "timeout").inc()
            raise RequestTimeoutError(f"{model} did not answer within {timeout} s", param="model") from None
        finally:
            gauge.dec()
            lane_s = reply.model_time.lane_s if isinstance(reply, Reply) else None
            self.admission[model].release(ticket, lane_s, timed_out=timed_out)
        if isinstance(reply, ErrorReply):
            raise reply.to_error()
        self.metrics.batch_size.labels(model, method).observe(reply.batch_size)
        headers = {**reply.headers, "server-timing": reply.server_timing(time.perf_counter() - called)}
        return Response(reply.body, media_type=reply.media_type, headers=headers)

    def _pixel_cost(self, shape: list[int], options: EncodeOptions) -> Cost:
        """A tensor body's encode cost, refused (413) over the limits before it is parsed."""
        if len(shape) not in (4, 5):
            raise ShapeMismatchError(
                f"pixels must be (1, 3, H, W) or (1, 3, T, H, W), got shape {shape}", param="shape"
            )
        return check_encode_cost(tuple(shape), options, self.limits)

    def _media_cost(self, body: bytes, options: EncodeOptions) -> Cost:
        """An image or video body priced from its header: refused (413) when a frame, after the
        resize, is over the pixel cap; frames are counted exactly once decoded (in the replica)."""
        dims = media.probe_dimensions(body)
        if dims is None:
            return Cost(1, 1)
        frames, height, width = dims
        cost = check_encode_cost((1, 3, height, width), options, self.limits)
        if frames is None:
            return cost
        kept = min(math.ceil(frames / options.stride), options.max_frames or self.limits.max_frames)
        return Cost(cost.height, cost.width, frames=kept)

    # ---- routes ----

    @app.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness: the ingress answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz(self) -> JSONResponse:
        """Readiness: every model deployment has a replica that answers."""
        try:
            await asyncio.gather(*(asyncio.wait_for(h.ready.remote(), 5.0) for h in self.workers.values()))
        except (TimeoutError, RayActorError, ActorUnavailableError, BackPressureError):
            return error_response(
                OverloadedError("models are not ready yet", retry_after=self.config.retry_after_s)
            )
        return JSONResponse({"status": "ready", "models": sorted(self.workers)})

    @app.get("/metrics", response_class=Response, responses=METRICS_RESPONSES)
    async def metrics_route(self) -> Response:
        """Prometheus metrics: requests and latency by route and served model, batch sizes, queue depth."""
        body, media_type = self.metrics.render()
        return Response(body, media_type=media_type)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(self) -> dict:
        return {"models": [await self._describe(name) for name in self.workers]}

    @app.get("/v1/models/{model}", response_model=ModelInfo, responses=ERRORS)
    async def get_model(self, model: ModelName) -> dict:
        return await self._describe(model)

    @app.post(
        "/v1/models/{model}/encode",
        openapi_extra=ENCODE_BODY,
        responses={**ENCODE_RESPONSES, **ERRORS},
        dependencies=[strict_query(EncodeParams)],
    )
    async def encode(
        self, request: Request, model: ModelName, params: Annotated[EncodeParams, Query()]
    ) -> Response:
        """Image, video or pixel tensor -> latent file (or raw latents with ``Accept: tensor/binary``)."""
        job = EncodeJob(options=params.to_options(), scaling=params.scaling())
        return await self._encode(request, model, job, params, default_output="file")

    @app.post(
        "/v1/models/{model}/diffusers/encode",
        openapi_extra=ENCODE_BODY,
        responses={**ENCODE_RESPONSES, **ERRORS},
        dependencies=[strict_query(DiffusersEncodeParams)],
    )
    async def diffusers_encode(
        self, request: Request, model: ModelName, params: Annotated[DiffusersEncodeParams, Query()]
    ) -> Response:
        """diffusers ``remote_encode`` protocol: raw latents back as tensor/binary with shape/dtype
        headers; scaled by ``(raw - shift_factor) * scaling_factor`` only when those are given."""
        job = EncodeJob(options=EncodeOptions(normalize=False), scaling=params.scaling())
        return await self._encode(request, model, job, params, default_output="tensor")

    async def _encode(
        self, request: Request, model: str, job: EncodeJob, params: DiffusersEncodeParams, default_output: str
    ) -> Response:
        self._handle(model)
        body = await request.body()
        content_type = _content_type(request)
        job.output = "tensor" if _accepts(request) == TENSOR_TYPE else default_output
        info = await self._describe(model)
        if content_type == TENSOR_TYPE or (params.shape and content_type in ("", "application/octet-stream")):
            shape = parse_shape(params.shape)
            cost = self._pixel_cost(shape, job.options)
            frames = shape[2] if len(shape) == 5 else None
            check_media_kind(model, info["modality"], "video" if frames else "image", frames)
            job.tensor = tensor_from_bytes(body, shape, params.dtype)
        elif content_type.startswith(("image/", "video/")) or content_type in (
            "",
            "application/octet-stream",
        ):
            if not body:
                raise InvalidRequestError("request body is empty; expected an image or a video", param="body")
            # what the body is (magic bytes) decides before admission: a video for an image model is
            # a 422 at once, never a 503 from a queue it should not have joined
            check_media_kind(model, info["modality"], media.sniff_media(body))
            cost = self._media_cost(body, job.options)
            job.data = body
        else:
            raise UnsupportedMediaTypeError(
                f"encode takes image/*, video/* or {TENSOR_TYPE} bodies, got {content_type!r}",
                param="content-type",
            )
        return await self._call(model, "encode", job, cost)

    @app.post(
        "/v1/models/{model}/decode",
        openapi_extra=DECODE_BODY,
        responses={**DECODE_RESPONSES, **ERRORS},
        dependencies=[strict_query(DecodeParams)],
    )
    async def decode(
        self, request: Request, model: ModelName, params: Annotated[DecodeParams, Query()]
    ) -> Response:
        """Latent file or latent tensor -> PNG/JPEG/WebP/MP4, or pixels as tensor/binary.

        Accepts the diffusers remote-VAE parameters (``output_type``, ``image_format``,
        ``partial_postprocess``, ``scaling_factor``, ``shift_factor``, ``height``/``width``), so that
        ``diffusers.utils.remote_utils.remote_decode`` works against this route unchanged.
        """
        self._handle(model)
        body = await request.body()
        job = DecodeJob(options=params.to_options())
        if _content_type(request) == TENSOR_TYPE and params.dtype == ID_DTYPE:
            job.tokens = self._id_tensor(body, params)
            is_video, frames = job.tokens.ndim == 4, job.tokens.shape[1] if job.tokens.ndim == 4 else 1
            job.options = replace(job.options, fps=params.fps or self.config.default_fps)
        elif _content_type(request) == TENSOR_TYPE:
            job.tensor = await self._latent_tensor(model, body, params)
            job.normalized = params.normalized
            is_video, frames = job.tensor.ndim == 5, job.tensor.shape[2] if job.tensor.ndim == 5 else 1
            job.options = replace(job.options, fps=params.fps or self.config.default_fps)
        elif _content_type(request) in ("", LATENT_FILE_TYPE, "application/octet-stream"):
            encoded = encoded_from_bytes(body)
            if isinstance(encoded, TokenIds):
                job.tokens = encoded
                is_video = encoded.layout == "NTHW"
            else:
                job.latents = encoded
                is_video = encoded.layout == "NCTHW"
            frames = encoded.original_frames if is_video else 1
        else:
            raise UnsupportedMediaTypeError(
                f"decode takes {LATENT_FILE_TYPE} or {TENSOR_TYPE} bodies, got {_content_type(request)!r}",
                param="content-type",
            )
        scaling = params.scaling()
        if scaling is not None and job.latents is not None:
            raise InvalidRequestError(
                "scaling_factor/shift_factor apply to tensor/binary latents; a latent file records its own "
                "normalization (send the file without them)",
                param="scaling_factor" if params.scaling_factor is not None else "shift_factor",
            )
        job.scaling = scaling  # tensor latents scaled as (raw - shift_factor) * scaling_factor
        accepts = _accepts(request)
        if params.output_type is not None:
            apply_decode_protocol(job, params, accepts_tensor=accepts == TENSOR_TYPE)
        elif params.format == "tensor" or (params.format is None and accepts == TENSOR_TYPE):
            job.format = None
        elif params.format is not None:
            job.format = "jpeg" if params.format == "jpg" else params.format
        else:
            job.format = IMAGE_ACCEPT.get(accepts, "mp4" if is_video and frames != 1 else "png")
        info = await self._describe(model)
        if job.tokens is not None:  # ids decode from latents (N, c, [t,] h, w) of the model's channels
            ids = job.tokens.ids if isinstance(job.tokens, TokenIds) else job.tokens
            latent_shape = (ids.shape[0], info["latent_channels"], *ids.shape[1:])
        else:
            latent_shape = tuple((job.latents.latents if job.latents is not None else job.tensor).shape)
        rule = FrameRule(info["temporal_compression"], info["causal"])
        cost = check_decode_cost(latent_shape, info["spatial_compression"], rule, self.limits)
        return await self._call(model, "decode", job, cost)

    def _id_tensor(self, body: bytes, params: DecodeParams) -> torch.Tensor:
        """A tensor/binary body of int32 token ids (N, [t,] h, w), under the latent element cap."""
        shape = parse_shape(params.shape)
        if math.prod(shape) > self.limits.max_latent_elements:  # before the body becomes a tensor
            raise LimitExceededError(
                f"token ids must have at most {self.limits.max_latent_elements:,} elements, got shape {shape}",
                param="shape",
            )
        if len(shape) not in (3, 4):
            raise ShapeMismatchError(
                f"token ids are (N, h, w) or (N, t, h, w), got shape {shape}", param="shape"
            )
        return tensor_from_bytes(body, shape, params.dtype, ID_DTYPES)

    async def _latent_tensor(self, model: str, body: bytes, params: DecodeParams) -> torch.Tensor:
        """A tensor/binary body -> latents (N, C, [t,] h, w); FLUX-packed (N, L, 4C) ones are unpacked."""
        shape = parse_shape(params.shape)
        if math.prod(shape) > self.limits.max_latent_elements:  # before the body becomes a tensor
            raise LimitExceededError(
                f"latents must have at most {self.limits.max_latent_elements:,} elements, got shape {shape}",
                param="shape",
            )
        tensor = tensor_from_bytes(body, shape, params.dtype, LATENT_DTYPES)
        if tensor.ndim != 3:
            return tensor
        if params.height is None or params.width is None:
            raise InvalidRequestError("packed (3-d) latents need height and width", param="shape")
        info = await self._describe(model)
        return unpack_latents(tensor, params.height, params.width, info["spatial_compression"])
