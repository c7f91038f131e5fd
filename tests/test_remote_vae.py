"""serving.remote_vae without a server: FLUX-packed latents unpack as diffusers packs them, and the
protocol's output choices map onto this service's output fields."""

from __future__ import annotations

import pytest
import torch

from serving.jobs import DecodeJob
from serving.remote_vae import apply_decode_protocol, unpack_latents
from serving.schemas import DiffusersDecodeParams
from tokenizers_svc.errors import ShapeMismatchError


def flux_pack(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h/2 * w/2, 4C): 2x2 patches, as diffusers' FluxPipeline._pack_latents
    (importing the pipeline needs transformers, which this project does not install)."""
    n, c, h, w = latents.shape
    patches = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // 2) * (w // 2), c * 4)


def test_unpacking_inverts_the_flux_pipelines_packing():
    latents = torch.randn(2, 16, 8, 12)  # (N, C, h, w) for a 64x96 image at f8
    packed = flux_pack(latents)
    torch.testing.assert_close(unpack_latents(packed, 64, 96, 8), latents, rtol=0, atol=0)
    with pytest.raises(ShapeMismatchError, match="packed latents for 64x64"):
        unpack_latents(packed, 64, 64, 8)


@pytest.mark.parametrize(
    "params, accepts_tensor, expected",
    [
        ({"output_type": "mp4"}, False, ("mp4", None)),
        ({"output_type": "pil", "image_format": "png"}, False, ("png", None)),
        ({"output_type": "pil"}, True, (None, ("float32", "unit", False))),
        ({"output_type": "pt", "partial_postprocess": True}, True, (None, ("uint8", "uint8", True))),
        ({"output_type": "pt"}, True, (None, ("float32", "signed", False))),
    ],
)
def test_output_choices_map_onto_formats_and_tensor_outputs(params, accepts_tensor, expected):
    job = DecodeJob(tensor=torch.zeros(1, 4, 8, 8))
    apply_decode_protocol(job, DiffusersDecodeParams(**params), accepts_tensor)
    tensor = job.tensor_output
    described = None if job.format else (tensor.dtype, tensor.range, tensor.channels_last)
    assert (job.format, described) == expected


def test_scaling_comes_from_the_request_unless_the_model_scales():
    job = DecodeJob(tensor=torch.zeros(1, 4, 8, 8))
    apply_decode_protocol(
        job, DiffusersDecodeParams(output_type="pt", scaling_factor=0.5, shift_factor=0.1), True
    )
    assert not job.normalized and (job.scaling.scale, job.scaling.shift) == (0.5, 0.1)
    apply_decode_protocol(job, DiffusersDecodeParams(output_type="pt", do_scaling=True), True)
    assert job.normalized and job.scaling is None
