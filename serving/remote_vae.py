"""The diffusers remote-VAE protocol (``diffusers.utils.remote_utils.remote_encode/remote_decode``).

Kept apart from the routes so that the HTTP layer only parses and dispatches: this module maps the
protocol's choices onto this service's jobs (its explicit ``scaling_factor``/``shift_factor`` become
a :class:`~tokenizers_svc.spec.LatentNormalization`, applied by the replica) and unpacks FLUX-style
packed latents.
"""

from __future__ import annotations

import torch

from serving.jobs import DecodeJob, TensorOutput
from serving.schemas import DiffusersDecodeParams
from tokenizers_svc.errors import ShapeMismatchError


def unpack_latents(tensor: torch.Tensor, height: int, width: int, compression: int) -> torch.Tensor:
    """Packed (N, h/2*w/2, C*4) latents (FLUX-style 2x2 patches) -> (N, C, h, w)."""
    n, length, packed = tensor.shape
    h, w = 2 * (height // (compression * 2)), 2 * (width // (compression * 2))
    if length != (h // 2) * (w // 2) or packed % 4:
        raise ShapeMismatchError(
            f"packed latents for {height}x{width} need shape (N, {(h // 2) * (w // 2)}, 4*C), got {tuple(tensor.shape)}",
            param="shape",
        )
    grid = tensor.view(n, h // 2, w // 2, packed // 4, 2, 2)  # (N, h/2, w/2, C, 2, 2)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(n, packed // 4, h, w)  # (N, C, h, w)


def apply_decode_protocol(job: DecodeJob, params: DiffusersDecodeParams, accepts_tensor: bool) -> None:
    """``remote_decode`` output choices -> this service's output fields.

    - ``mp4``: MP4 bytes;  ``pil`` with Accept image/*: PNG/JPEG bytes;
    - ``pil`` with Accept tensor/binary (a processor on the client): float [0, 1] channels-first;
    - ``pt`` + ``partial_postprocess``: uint8 channels-last; ``pt`` alone: float [-1, 1] channels-first
      in the request's dtype.

    The latents are normalized by the model's constants only with ``do_scaling``, else by the
    request's ``scaling_factor``/``shift_factor`` when given, else raw.
    """
    source = job.tensor if job.tensor is not None else job.latents.latents
    source_dtype = str(source.dtype).removeprefix("torch.")
    if params.output_type == "mp4":
        job.format = "mp4"
    elif params.output_type == "pil" and not accepts_tensor:
        job.format = "png" if params.image_format == "png" else "jpeg"
    elif params.output_type == "pil":
        job.format, job.tensor_output = None, TensorOutput(dtype=source_dtype, range="unit")
    elif params.partial_postprocess:
        job.format, job.tensor_output = None, TensorOutput(dtype="uint8", range="uint8", channels_last=True)
    else:
        job.format, job.tensor_output = None, TensorOutput(dtype=source_dtype, range="signed")
    job.normalized = bool(params.do_scaling)
    job.scaling = params.scaling()
