"""Parameters and compute of a preset, measured without allocating weights.

The module is built on ``torch.device("meta")`` (shapes only, no storage), so even the 1B-parameter
presets cost milliseconds and no memory. Compute is counted by running encode and decode on meta
tensors under :class:`torch.utils.flop_counter.FlopCounterMode`: on the meta device
``scaled_dot_product_attention`` decomposes into the ``bmm`` calls the counter sees (on CPU tensors
the fused kernel is invisible to it), so attention is included.

Convention: **GFLOPs = 10^9 multiply-accumulates** (one fused multiply-add counts once), the
convention of fvcore and of the ViTok paper's tables (its S-B/16 figure of 34.8 GFLOPs at 256p is a
MAC count). ``FlopCounterMode`` counts 2 FLOPs per MAC, so its total is halved here; hardware FLOPs
are twice the numbers reported. Like fvcore, element-wise work (norms, activations) is not counted.

Reference inputs: one 256x256 image, or one 17-frame 256x256 clip padded to the model's frame rule
(17 frames for ``1 + 4k``/``1 + 8k`` causal models, 20 for ViTok's 4-frame tubelets).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from tokenizers_svc.families.base import Backend
from tokenizers_svc.registry import Preset, backend_for, get_preset, model_class, preset_config
from tokenizers_svc.spec import TokenizerSpec

REFERENCE_SIZE = 256  # pixels per side of the reference image / clip
REFERENCE_FRAMES = 17  # frames of the reference clip (before padding to the frame rule)
FLOPS_PER_MAC = 2  # what FlopCounterMode counts per multiply-accumulate


@dataclass(frozen=True)
class ModelStats:
    """What one preset costs. ``*_gflops`` are 10^9 MACs for one reference input (module docstring)."""

    name: str
    params: int
    encoder_gflops: float
    decoder_gflops: float
    input_shape: tuple[int, ...]  # (1, C, H, W) or (1, C, T, H, W), already padded to the frame rule

    @property
    def gflops(self) -> float:
        return self.encoder_gflops + self.decoder_gflops

    def to_dict(self) -> dict:
        return {**asdict(self), "gflops": self.gflops, "input_shape": list(self.input_shape)}


def meta_backend(preset: Preset, config: dict | None = None) -> Backend:
    """The preset's backend around a module on the meta device (no weights read or allocated)."""
    config = preset_config(preset) if config is None else config
    backend_class = backend_for(preset.class_name)
    module = backend_class.meta_module(model_class(preset.class_name), config)
    backend = backend_class.from_module(module.eval(), preset.name)
    # constants some classes clone from CPU tensors at init (e.g. Cosmos' wavelet filters) would
    # meet meta activations in forward; the spec has read what it needs, so move them too
    module.to("meta")
    return backend


def reference_shape(spec: TokenizerSpec, size: int = REFERENCE_SIZE, frames: int = REFERENCE_FRAMES) -> tuple:
    """(1, C, size, size) for image models, (1, C, T, size, size) with T = frames padded, for video."""
    if spec.modality == "image":
        return (1, spec.in_channels, size, size)
    return (1, spec.in_channels, spec.frame_rule.padded_frames(frames), size, size)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_gflops(backend: Backend, input_shape: tuple[int, ...]) -> tuple[float, float]:
    """(encoder, decoder) GMACs for one input of ``input_shape``, counted on meta tensors."""
    x = torch.empty(input_shape, device="meta")
    with torch.no_grad():
        with FlopCounterMode(display=False) as encode_counter:
            mean, _ = backend.encode_moments(x)
        with FlopCounterMode(display=False) as decode_counter:
            backend.decode_latents(mean)
    to_gmacs = 1.0 / (FLOPS_PER_MAC * 1e9)
    return encode_counter.get_total_flops() * to_gmacs, decode_counter.get_total_flops() * to_gmacs


def backend_stats(name: str, backend: Backend, input_shape: tuple[int, ...] | None = None) -> ModelStats:
    """Parameters and GMACs of a (meta-device) backend at ``input_shape`` (default: the reference)."""
    shape = tuple(input_shape) if input_shape is not None else reference_shape(backend.spec)
    encoder, decoder = count_gflops(backend, shape)
    return ModelStats(
        name=name,
        params=count_params(backend.module),
        encoder_gflops=encoder,
        decoder_gflops=decoder,
        input_shape=shape,
    )


def preset_stats(
    name_or_preset: str | Preset, input_shape: tuple[int, ...] | None = None, config: dict | None = None
) -> ModelStats:
    """Parameters and GMACs of a preset at ``input_shape`` (default: the reference input)."""
    preset = get_preset(name_or_preset) if isinstance(name_or_preset, str) else name_or_preset
    return backend_stats(preset.name, meta_backend(preset, config), input_shape)
