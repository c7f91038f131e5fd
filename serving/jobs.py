"""What the ingress sends a model deployment, and what comes back.

The ingress turns an HTTP request into an :class:`EncodeJob` or :class:`DecodeJob` (bodies parsed,
options built); the replica answers with a :class:`Reply`, or an :class:`ErrorReply` carrying a
library error's JSON shape and status, so that no exception has to survive pickling between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from serving.admission import Lane
from tokenizers_svc.errors import TokenizerError, error_from_dict
from tokenizers_svc.latents import Latents
from tokenizers_svc.pipeline import DecodeOptions, EncodeOptions
from tokenizers_svc.spec import LatentNormalization
from tokenizers_svc.tokens import TokenIds


@dataclass
class EncodeJob:
    """``data``: image/video file bytes, or ``tensor``: pixels (N, 3, H, W) / (N, 3, T, H, W),
    uint8 [0, 255] or float [-1, 1]. ``output``: the latent file, or the bare latent tensor."""

    options: EncodeOptions
    data: bytes | None = None
    tensor: torch.Tensor | None = None
    output: Literal["file", "tensor"] = "file"
    scaling: LatentNormalization | None = None  # diffusers protocol: instead of the model's own
    deadline: float | None = None  # time.time() after which nobody waits for the answer
    lane: Lane = "small"  # the admission lane the ingress priced it in: the decode slots it waits for


@dataclass(frozen=True)
class TensorOutput:
    """How decoded pixels are returned as a bare tensor.

    ``range``: "signed" float [-1, 1], "unit" float [0, 1], or "uint8" [0, 255];
    ``channels_last``: (N, H, W, C) / (N, T, H, W, C) instead of channels-first.
    """

    dtype: str = "float32"
    range: Literal["signed", "unit", "uint8"] = "signed"
    channels_last: bool = False


@dataclass
class DecodeJob:
    """``latents`` (from a latent file, metadata included), ``tokens`` (ids), or a bare ``tensor`` (N, C, h, w) /
    (N, C, t, h, w) float, normalized by the model's constants (``normalized``) or by ``scaling``.
    ``format``: png | jpeg | webp | mp4 for media, or None with ``tensor_output`` for a tensor."""

    options: DecodeOptions = field(default_factory=DecodeOptions)
    latents: Latents | None = None
    tokens: TokenIds | torch.Tensor | None = None  # a token file, or bare int32 ids: quantized models
    tensor: torch.Tensor | None = None
    normalized: bool = True
    scaling: LatentNormalization | None = None  # diffusers protocol: instead of the model's own
    format: str | None = "png"
    tensor_output: TensorOutput = field(default_factory=TensorOutput)
    deadline: float | None = None  # time.time() after which nobody waits for the answer


@dataclass(frozen=True)
class ModelTime:
    """What a request's model work took, its share of its batch's (by batch units): ``compute_s``
    the call's wall time, ``lane_s`` its lane seconds (``serving/threads.py``: calls side by side
    divide their wall time between them), the rate its lane's queue drains at, which admission
    prices the queue with."""

    compute_s: float = 0.0
    lane_s: float = 0.0

    def share(self, fraction: float) -> ModelTime:
        return ModelTime(self.compute_s * fraction, self.lane_s * fraction)


@dataclass
class Reply:
    body: bytes
    media_type: str
    headers: dict[str, str]
    batch_size: int
    model_time: ModelTime = field(default_factory=ModelTime)
    media_s: float = 0.0  # decoding the request's media (encode) or writing the output media (decode)
    replica_s: float = 0.0  # from the job's arrival in the replica to this reply

    def server_timing(self, call_s: float) -> str:
        """The ``Server-Timing`` header of the answer, in ms: where the request's time went
        (``call_s``: the ingress's handle call). ``hop`` is the call less the replica's time
        (the actor hop both ways, bodies included); ``queue`` the replica's time outside media and
        model (waiting for the model or a batch, building the reply)."""
        queue = self.replica_s - self.media_s - self.model_time.compute_s
        parts = {
            "hop": call_s - self.replica_s,
            "media": self.media_s,
            "queue": queue,
            "model": self.model_time.compute_s,
        }
        return ", ".join(f"{name};dur={max(0.0, seconds) * 1e3:.1f}" for name, seconds in parts.items())


@dataclass
class ErrorReply:
    """A library error as a value: its JSON shape (``TokenizerError.to_dict``) and, for 503, when
    to retry; :meth:`to_error` raises it again in the ingress."""

    error: dict
    retry_after: float | None = None  # seconds, sent as Retry-After (503)

    @classmethod
    def of(cls, error: TokenizerError) -> ErrorReply:
        return cls(error.to_dict(), getattr(error, "retry_after", None))

    def to_error(self) -> TokenizerError:
        return error_from_dict(self.error, retry_after=self.retry_after)
