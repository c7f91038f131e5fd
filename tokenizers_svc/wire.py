"""The ``tensor/binary`` wire format: bare tensors as bytes, with their shape and dtype beside them.

One codec for every place a tensor crosses a process boundary as bytes: the HTTP client and the
server (request and response bodies, with ``shape``/``dtype`` query parameters or headers) and
the batch job's rows between its stages (``pixels`` + ``pixel_shape`` + ``pixel_dtype``).

Layout: little-endian, C-order element bytes, no header; ``len(body) == prod(shape) * itemsize``.
bfloat16 travels as its 16-bit pattern (numpy has no bfloat16).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import torch

from tokenizers_svc.errors import DTypeMismatchError, InvalidRequestError, ShapeMismatchError
from tokenizers_svc.latents import LATENT_DTYPES
from tokenizers_svc.spec import ID_DTYPE

TENSOR_TYPE = "tensor/binary"
LATENT_FILE_TYPE = "application/x-safetensors"  # the latent file (tokenizers_svc.latents)
PIXEL_DTYPES: dict[str, torch.dtype] = {"uint8": torch.uint8, **LATENT_DTYPES}  # uint8 [0,255], float [-1,1]
ID_DTYPES: dict[str, torch.dtype] = {ID_DTYPE: torch.int32}  # token ids of quantized tokenizers


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> "float32", the name the wire carries."""
    return str(dtype).removeprefix("torch.")


def tensor_to_bytes(tensor: torch.Tensor, allowed: Mapping[str, torch.dtype] = PIXEL_DTYPES) -> bytes:
    """Any tensor of an ``allowed`` dtype -> its little-endian C-order bytes (one copy, on the CPU)."""
    if dtype_name(tensor.dtype) not in allowed:
        raise DTypeMismatchError(
            f"tensor dtype must be one of {sorted(allowed)}, got {dtype_name(tensor.dtype)}", param="dtype"
        )
    flat = tensor.detach().contiguous().cpu()
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return flat.numpy().tobytes()


def tensor_from_bytes(
    body: bytes, shape: Sequence[int], dtype: str | None, allowed: Mapping[str, torch.dtype] = PIXEL_DTYPES
) -> torch.Tensor:
    """Bytes + shape + dtype name -> a tensor of its own (writable) memory, after checking that the
    dtype is ``allowed`` (DTypeMismatchError) and that the size matches (ShapeMismatchError)."""
    if dtype not in allowed:
        raise DTypeMismatchError(f"dtype must be one of {sorted(allowed)}, got {dtype!r}", param="dtype")
    torch_dtype = allowed[dtype]
    expected = math.prod(shape) * torch_dtype.itemsize
    if len(body) != expected:
        raise ShapeMismatchError(
            f"body has {len(body)} bytes; shape {list(shape)} of {dtype} needs {expected}", param="shape"
        )
    return torch.frombuffer(bytearray(body), dtype=torch_dtype).reshape(list(shape))


def parse_shape(values: Sequence[str]) -> list[int]:
    """``shape=1&shape=4`` (diffusers/requests style), ``shape=1,4`` or ``shape=[1,4]`` -> [1, 4]."""
    if not values:
        raise InvalidRequestError("tensor/binary bodies need a 'shape' query parameter", param="shape")
    text = values[0] if len(values) == 1 else ",".join(values)
    try:
        shape = [int(v) for v in text.strip("[]()").split(",") if v.strip()]
    except ValueError:
        raise InvalidRequestError(
            f"shape must be comma-separated positive integers, got {list(values)}", param="shape"
        ) from None
    if not shape or any(d <= 0 for d in shape):
        raise ShapeMismatchError(f"shape must be non-empty positive integers, got {shape}", param="shape")
    return shape


def tensor_params(tensor: torch.Tensor) -> dict[str, str]:
    """The query parameters a request with this tensor as its body carries: ``shape=1,3,H,W``, ``dtype``."""
    return {"shape": ",".join(str(d) for d in tensor.shape), "dtype": dtype_name(tensor.dtype)}


def tensor_headers(tensor: torch.Tensor) -> dict[str, str]:
    """The headers a response with this tensor as its body carries: ``shape: [1, 4, 8, 8]``, ``dtype``."""
    return {"shape": json.dumps(list(tensor.shape)), "dtype": dtype_name(tensor.dtype)}


def tensor_from_headers(body: bytes, headers: Mapping[str, str]) -> torch.Tensor:
    """A response body + its ``shape``/``dtype`` headers (:func:`tensor_headers`) -> tensor."""
    return tensor_from_bytes(body, json.loads(headers["shape"]), headers["dtype"])
