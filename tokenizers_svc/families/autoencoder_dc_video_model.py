"""The DC-AE video network: an image DC-AE on every frame plus a causal temporal codec in its latent space.

The backend and presets live in :mod:`tokenizers_svc.families.autoencoder_dc_video`, which the registry imports
on every start; this module (diffusers' ModelMixin) is imported only when such a model is built.

Why this shape: a video tokenizer trained end to end on four real clips learned their scenes, not
video (issue 23: -2.5 dB against bicubic on unseen still shots and camera moves). The image default
(DC-AE f8c4) generalises to unseen photos. Here its encoder and decoder are the per-frame spatial
path, unchanged, and only a small network that trades frames for latent frames is learned:

- encode: every frame -> image latent ``z_f`` (c channels at 1/8), normalized per channel with the
  image model's statistics; latent frame 0 is ``z_0`` itself (so an image is a one-frame clip and
  its latent is the image model's); latent frame ``j >= 1`` is ``z_{tj}`` plus a learned correction
  from frames ``t(j-1) .. tj`` (causal: never a later frame).
- decode: frame 0 is latent frame 0; the frames between latent frames ``j-1`` and ``j`` are their
  linear interpolation plus a learned correction from latent frames ``j-1, j, j+1``; then every frame
  goes through the image decoder.

Both corrections start at zero (zero-initialised output convolutions), so an untrained model is the
image model on every ``t``-th frame with latent-space interpolation in between: the same float budget
as a ``t``-frame-rule bicubic codec, with the image model's gain on every kept frame.

Layouts at the boundary (the :class:`~tokenizers_svc.families.base.Backend` contract):

- pixels: ``(N, 3, T, H, W)`` float in [-1, 1], ``T = 1 + t k``, ``H, W`` multiples of the spatial factor;
- latents: ``(N, c, 1 + k, H/f, W/f)``, in the units of the normalized image latent.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, EncoderOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from tokenizers_svc.errors import ShapeMismatchError

# Image-model config keys that are statistics, not constructor arguments of AutoencoderDC.
_STATISTICS_KEYS = ("latents_mean", "latents_std", "shift_factor")
FRAME_BATCH = 8  # frames per spatial encoder/decoder call: bounds activation memory on long clips


class ResBlock(nn.Module):
    """conv3x3 -> SiLU -> conv3x3 (dilated), residual; (B, C, h, w) -> (B, C, h, w)."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class LatentCodec(nn.Module):
    """``in_channels`` -> ``out_channels`` at latent resolution: conv, residual blocks with growing
    dilation (a receptive field of ~20 latent pixels for motion), zero-initialised output conv."""

    def __init__(self, in_channels: int, out_channels: int, width: int, blocks: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.Sequential(*(ResBlock(width, dilation=2 ** (i % 3)) for i in range(blocks)))
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.blocks(self.conv_in(x))))


class AutoencoderDCVideo(ModelMixin, ConfigMixin):
    """Per-frame DC-AE (``spatial_config``: an :class:`~diffusers.AutoencoderDC` config) + causal temporal codec.

    ``frame_latents_mean/std``: the image latent's per-channel statistics (fixed; the temporal codec
    works on normalized image latents). ``latents_mean/std``, ``scaling_factor``, ``shift_factor``:
    the video latent's own normalization, fitted by ``training.latent_stats`` and read by the backend.
    """

    @register_to_config
    def __init__(
        self,
        spatial_config: dict | None = None,
        frame_latents_mean: list[float] | None = None,
        frame_latents_std: list[float] | None = None,
        temporal_compression: int = 4,
        temporal_width: int = 64,
        encoder_blocks: int = 2,
        decoder_blocks: int = 3,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ) -> None:
        super().__init__()
        self.spatial = AutoencoderDC(**(spatial_config or {}))
        c = self.spatial.config.latent_channels
        t = temporal_compression
        mean = torch.tensor(frame_latents_mean or [0.0] * c).view(1, c, 1, 1, 1)
        std = torch.tensor(frame_latents_std or [1.0] * c).view(1, c, 1, 1, 1)
        self.register_buffer("frame_mean", mean, persistent=False)  # config holds them
        self.register_buffer("frame_std", std, persistent=False)
        # latent frame j >= 1 from frames t(j-1) .. tj (t + 1 frames): a correction of frame tj's latent
        self.temporal_encoder = LatentCodec(c * (t + 1), c, temporal_width, encoder_blocks)
        # the t frames after latent frame j-1 from latent frames j-1, j, j+1: corrections of the lerp
        self.temporal_decoder = LatentCodec(3 * c, c * t, temporal_width, decoder_blocks)

    @classmethod
    def from_image_model(cls, directory: str | Path, **temporal) -> AutoencoderDCVideo:
        """A model whose spatial path is the ``AutoencoderDC`` saved in ``directory`` (weights and
        per-channel statistics copied; ``latents_mean/std`` in its config.json are required), with
        a fresh temporal codec built from ``temporal`` (constructor keywords)."""
        config = AutoencoderDC.load_config(str(directory))
        if config.get("latents_mean") is None or config.get("latents_std") is None:
            raise ValueError(f"{directory} has no latents_mean/latents_std (fit them: training.latent_stats)")
        spatial = {k: v for k, v in config.items() if not k.startswith("_") and k not in _STATISTICS_KEYS}
        fixed = ("spatial_config", "frame_latents_mean", "frame_latents_std", "latents_mean", "latents_std")
        temporal = {k: v for k, v in temporal.items() if k not in fixed}
        channels = len(config["latents_mean"])
        model = cls(
            spatial_config=spatial,
            frame_latents_mean=list(config["latents_mean"]),
            frame_latents_std=list(config["latents_std"]),
            # the video latent is in normalized image-latent units: centred and unit-variance until
            # its own statistics are fitted (training.latent_stats)
            latents_mean=[0.0] * channels,
            latents_std=[1.0] * channels,
            **temporal,
        )
        image = AutoencoderDC.from_pretrained(str(directory))
        model.spatial.load_state_dict(image.state_dict())
        return model

    # ------------------------------------------------------------------------------ per-frame path

    def frame_latents(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, H, W) float [-1, 1] -> normalized image latents (N, c, T, H/f, W/f)."""
        n, _, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(n * t, 3, h, w)  # (N*T, 3, H, W)
        z = torch.cat([self.spatial.encode(chunk).latent for chunk in frames.split(FRAME_BATCH)])
        z = z.reshape(n, t, *z.shape[1:]).transpose(1, 2)  # (N, c, T, h, w)
        return (z - self.frame_mean) / self.frame_std

    def frames_from_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized image latents (N, c, T, h, w) -> pixels (N, 3, T, H, W) float."""
        n, c, t, h, w = z.shape
        z = z * self.frame_std + self.frame_mean
        flat = z.transpose(1, 2).reshape(n * t, c, h, w)  # (N*T, c, h, w)
        x = torch.cat([self.spatial.decode(chunk).sample for chunk in flat.split(FRAME_BATCH)])
        return x.reshape(n, t, *x.shape[1:]).transpose(1, 2)  # (N, 3, T, H, W)

    # ------------------------------------------------------------------------------ temporal codec

    def temporal_down(self, z: torch.Tensor) -> torch.Tensor:
        """Frame latents (N, c, 1 + t k, h, w) -> latent frames (N, c, 1 + k, h, w)."""
        n, c, frames, h, w = z.shape
        t = self.config.temporal_compression
        if (frames - 1) % t:
            raise ShapeMismatchError(f"frames must be 1 + {t}k, got {frames}", param="pixels")
        k = (frames - 1) // t
        if k == 0:
            return z
        # group j (1..k) sees frames t(j-1) .. tj: windows of t + 1 frames with stride t
        windows = z.unfold(2, t + 1, t)  # (N, c, k, h, w, t + 1)
        windows = windows.permute(0, 2, 5, 1, 3, 4).reshape(n * k, (t + 1) * c, h, w)
        delta = self.temporal_encoder(windows).reshape(n, k, c, h, w).transpose(1, 2)  # (N, c, k, h, w)
        return torch.cat([z[:, :, :1], z[:, :, t::t] + delta], dim=2)

    def temporal_up(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent frames (N, c, 1 + k, h, w) -> frame latents (N, c, 1 + t k, h, w)."""
        n, c, length, h, w = latent.shape
        t = self.config.temporal_compression
        k = length - 1
        if k == 0:
            return latent
        previous, current = latent[:, :, :-1], latent[:, :, 1:]  # (N, c, k, h, w) each
        following = torch.cat([latent[:, :, 2:], latent[:, :, -1:]], dim=2)  # the last repeats itself
        context = torch.cat([previous, current, following], dim=1)  # (N, 3c, k, h, w)
        context = context.transpose(1, 2).reshape(n * k, 3 * c, h, w)
        delta = self.temporal_decoder(context).reshape(n, k, t, c, h, w)  # (N, k, t, c, h, w)
        weights = torch.arange(1, t + 1, device=latent.device, dtype=latent.dtype) / t  # (t,)
        weights = weights.view(1, 1, t, 1, 1, 1)
        lerp = (
            previous.transpose(1, 2).unsqueeze(2) * (1 - weights)
            + current.transpose(1, 2).unsqueeze(2) * weights
        )
        frames = (lerp + delta).reshape(n, k * t, c, h, w).transpose(1, 2)  # (N, c, t k, h, w)
        return torch.cat([latent[:, :, :1], frames], dim=2)

    # ------------------------------------------------------------------------------ public API

    def encode(self, x: torch.Tensor) -> EncoderOutput:
        """(N, 3, 1 + t k, H, W) float [-1, 1] -> ``.latent`` (N, c, 1 + k, H/f, W/f), as AutoencoderDC."""
        return EncoderOutput(latent=self.temporal_down(self.frame_latents(x)))

    def decode(self, latent: torch.Tensor) -> DecoderOutput:
        """(N, c, 1 + k, h, w) -> ``.sample`` (N, 3, 1 + t k, h f, w f) float, nominally [-1, 1]."""
        return DecoderOutput(sample=self.frames_from_latents(self.temporal_up(latent)))

    def frame_latent_objective(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, target), each (N, c, T, h, w): the temporal codec's round trip of the clip's
        normalized frame latents, and those latents (no gradient: the spatial path is not trained by
        this objective). Cheaper than a pixel loss by the decoder's forward and backward on every frame."""
        with torch.no_grad():
            target = self.frame_latents(x)
        return self.temporal_up(self.temporal_down(target)), target
