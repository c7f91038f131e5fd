"""HTTP client for the tokenizers-svc server, sync (:class:`Client`) and async (:class:`AsyncClient`).

Both build the same requests and parse the same responses; they differ only in the transport.
Overloaded answers (503/429) are retried with exponential backoff that honours ``Retry-After``;
every other error is raised as the typed error the server named (``errors.py``), e.g.
``LimitExceededError`` for a 413.

Inputs: file paths or bytes (image/video files, sent as-is), numpy arrays (H, W, 3) / (T, H, W, 3)
uint8 and torch tensors (1, 3, H, W) / (1, 3, T, H, W) uint8 [0, 255] or float [-1, 1] (sent as
``tensor/binary``).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from tokenizers_svc import errors
from tokenizers_svc.formats import SUFFIX_MEDIA_TYPES
from tokenizers_svc.latents import Latents
from tokenizers_svc.tokens import TokenIds, encoded_from_bytes
from tokenizers_svc.wire import (
    ID_DTYPES,
    LATENT_FILE_TYPE,
    PIXEL_DTYPES,
    TENSOR_TYPE,
    tensor_from_headers,
    tensor_params,
    tensor_to_bytes,
)

RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class RetryPolicy:
    """``max_retries`` extra attempts on 503/429; wait = Retry-After if given, else backoff * 2^attempt."""

    max_retries: int = 5
    backoff_s: float = 0.25
    max_wait_s: float = 30.0

    def wait(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(float(retry_after), self.max_wait_s)
            except ValueError:
                pass
        return min(self.backoff_s * 2**attempt, self.max_wait_s)


@dataclass
class _Request:
    method: str
    path: str
    content: bytes | None = None
    headers: dict[str, str] | None = None
    params: dict[str, Any] | None = None


def _encode_request(model: str, data: Any, accept: str, options: dict[str, Any]) -> _Request:
    """Files/bytes go as media; arrays and tensors as tensor/binary pixels."""
    params = {k: v for k, v in options.items() if v is not None}
    headers = {"accept": accept}
    if isinstance(data, np.ndarray):
        if data.ndim not in (3, 4) or data.shape[-1] != 3 or data.dtype != np.uint8:
            raise errors.ShapeMismatchError(
                f"arrays must be (H, W, 3) or (T, H, W, 3) uint8, got {data.shape} {data.dtype}", param="data"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(data)).movedim(-1, 0).unsqueeze(0)  # (1, 3, [T,] H, W)
        data = tensor
    if isinstance(data, torch.Tensor):
        headers["content-type"] = TENSOR_TYPE
        return _Request(
            "POST",
            f"/v1/models/{model}/encode",
            tensor_to_bytes(data),
            headers,
            {**params, **tensor_params(data)},
        )
    if isinstance(data, (str, Path)):
        path = Path(data)
        headers["content-type"] = SUFFIX_MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
        content = path.read_bytes()
    else:
        content = bytes(data)
        headers["content-type"] = "application/octet-stream"  # the server sniffs the magic bytes
    return _Request("POST", f"/v1/models/{model}/encode", content, headers, params)


def _decode_request(model: str, latents: Any, accept: str, options: dict[str, Any]) -> _Request:
    params = {k: v for k, v in options.items() if v is not None}
    headers = {"accept": accept}
    if isinstance(latents, (Latents, TokenIds)):
        content = latents.to_bytes()
        headers["content-type"] = LATENT_FILE_TYPE
    elif isinstance(latents, torch.Tensor):
        content = tensor_to_bytes(latents, PIXEL_DTYPES if latents.is_floating_point() else ID_DTYPES)
        headers["content-type"] = TENSOR_TYPE
        params.update(tensor_params(latents))
    else:
        content = Path(latents).read_bytes() if isinstance(latents, (str, Path)) else bytes(latents)
        headers["content-type"] = LATENT_FILE_TYPE
    return _Request("POST", f"/v1/models/{model}/decode", content, headers, params)


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()["error"]
        data = {"type": body["type"], "message": body["message"], "param": body.get("param")}
    except (json.JSONDecodeError, KeyError, TypeError):
        data = {"type": "http_error", "message": f"HTTP {response.status_code}: {response.text[:200]}"}
    error = errors.error_from_dict(
        data, status=response.status_code, retry_after=float(response.headers.get("retry-after", 1))
    )
    error.http_status = response.status_code
    raise error


def tensor_from_response(response: httpx.Response) -> torch.Tensor:
    """tensor/binary body + ``shape``/``dtype`` headers -> tensor."""
    return tensor_from_headers(response.content, response.headers)


class _Base:
    def __init__(self, base_url: str, api_key: str | None, retry: RetryPolicy) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.retry = retry


class Client(_Base):
    """Synchronous client. ``encode`` -> Latents, ``decode`` -> media bytes, ``*_tensor`` -> tensors."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        super().__init__(base_url, api_key, retry)
        self.http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _send(self, request: _Request) -> httpx.Response:
        for attempt in range(self.retry.max_retries + 1):
            response = self.http.request(
                request.method,
                request.path,
                content=request.content,
                headers=request.headers,
                params=request.params,
            )
            if response.status_code not in RETRY_STATUSES or attempt == self.retry.max_retries:
                break
            time.sleep(self.retry.wait(attempt, response.headers.get("retry-after")))
        _raise_for_error(response)
        return response

    def models(self) -> list[dict]:
        return self._send(_Request("GET", "/v1/models")).json()["models"]

    def model(self, name: str) -> dict:
        return self._send(_Request("GET", f"/v1/models/{name}")).json()

    def ready(self) -> bool:
        return self.http.get("/readyz").status_code == 200

    def encode(self, model: str, data: Any, **options: Any) -> Latents | TokenIds:
        """Options as the route's query parameters: normalize, sample, seed, resize, resolution, tiling,
        tokens (-> :class:`TokenIds` from a quantized model)..."""
        return encoded_from_bytes(self._send(_encode_request(model, data, LATENT_FILE_TYPE, options)).content)

    def encode_tensor(self, model: str, data: Any, **options: Any) -> torch.Tensor:
        """Bare latents (N, C, [t,] h, w) float32, normalized unless ``normalize=False``."""
        return tensor_from_response(self._send(_encode_request(model, data, TENSOR_TYPE, options)))

    def decode(self, model: str, latents: Any, format: str = "png", **options: Any) -> bytes:
        """Latents / latent file / tensor -> png | jpeg | webp | mp4 bytes."""
        return self._send(_decode_request(model, latents, "*/*", {"format": format, **options})).content

    def decode_tensor(self, model: str, latents: Any, **options: Any) -> torch.Tensor:
        """-> pixels (N, 3, [T,] H, W) float32 [-1, 1]; bare tensors take ``normalized=``."""
        return tensor_from_response(self._send(_decode_request(model, latents, TENSOR_TYPE, options)))


class AsyncClient(_Base):
    """Asynchronous twin of :class:`Client` (same methods, awaited)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        super().__init__(base_url, api_key, retry)
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _send(self, request: _Request) -> httpx.Response:
        for attempt in range(self.retry.max_retries + 1):
            response = await self.http.request(
                request.method,
                request.path,
                content=request.content,
                headers=request.headers,
                params=request.params,
            )
            if response.status_code not in RETRY_STATUSES or attempt == self.retry.max_retries:
                break
            await asyncio.sleep(self.retry.wait(attempt, response.headers.get("retry-after")))
        _raise_for_error(response)
        return response

    async def models(self) -> list[dict]:
        return (await self._send(_Request("GET", "/v1/models"))).json()["models"]

    async def model(self, name: str) -> dict:
        return (await self._send(_Request("GET", f"/v1/models/{name}"))).json()

    async def ready(self) -> bool:
        return (await self.http.get("/readyz")).status_code == 200

    async def encode(self, model: str, data: Any, **options: Any) -> Latents | TokenIds:
        response = await self._send(_encode_request(model, data, LATENT_FILE_TYPE, options))
        return encoded_from_bytes(response.content)

    async def encode_tensor(self, model: str, data: Any, **options: Any) -> torch.Tensor:
        return tensor_from_response(await self._send(_encode_request(model, data, TENSOR_TYPE, options)))

    async def decode(self, model: str, latents: Any, format: str = "png", **options: Any) -> bytes:
        return (
            await self._send(_decode_request(model, latents, "*/*", {"format": format, **options}))
        ).content

    async def decode_tensor(self, model: str, latents: Any, **options: Any) -> torch.Tensor:
        return tensor_from_response(await self._send(_decode_request(model, latents, TENSOR_TYPE, options)))
