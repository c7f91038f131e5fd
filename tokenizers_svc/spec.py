"""What a tokenizer says about itself: compression, constraints, latent normalization.

Every family builds a :class:`TokenizerSpec` from its saved config, so callers (the server's
``GET /v1/models/{model}``, the batch job, the CLI) never hard-code per-model constants.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from tokenizers_svc.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where tensors are made: listing specs needs no torch
    import torch

Modality = Literal["image", "video", "both"]
QUANTIZER_KINDS = ("fsq",)  # what a config's quantizer block may declare
VQ_KIND = "vq"  # a learned codebook the model class has itself (VQModel): declared by its backend
ID_DTYPE = "int32"  # token ids on every boundary: tensors, token files, HTTP bodies, batch columns
MAX_VOCABULARY = 2**31 - 1  # ids must fit int32


@dataclass(frozen=True)
class LatentNormalization:
    """``normalized = (raw - shift - mean[c]) / std[c] * scale``; the inverse undoes it exactly.

    Covers every convention in use: SD/SDXL/DC-AE/CogVideoX/Hunyuan (scale only), FLUX
    (shift + scale), Wan/Cosmos (per-channel mean/std), LTX/Mochi (per-channel mean/std and scale).

    ``scalar_fallback``: the ``(scaling_factor, shift_factor)`` a model's ``config.json`` offers
    pipelines that read only those two (``(raw - shift_factor) * scaling_factor``, diffusers'
    SANA/FLUX style) when that pair is not part of the exact formula above: this project's DC-AE
    exports with fitted per-channel statistics keep there one pair fitted over all channels (unit
    std, not centred per channel). None when ``scale``/``shift`` are what the config says.
    """

    scale: float = 1.0
    shift: float = 0.0
    mean: tuple[float, ...] | None = None  # per latent channel, or None
    std: tuple[float, ...] | None = None
    scalar_fallback: tuple[float, float] | None = None  # (scaling_factor, shift_factor), see above

    def _channel_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        view = (1, -1) + (1,) * (z.ndim - 2)
        mean = torch.tensor(self.mean if self.mean is not None else [0.0], dtype=torch.float32)
        std = torch.tensor(self.std if self.std is not None else [1.0], dtype=torch.float32)
        return mean.view(view).to(z.device), std.view(view).to(z.device)

    def apply(self, raw: torch.Tensor) -> torch.Tensor:
        """raw latents (N, C, ...) -> diffusion-ready latents, same shape and dtype."""
        mean, std = self._channel_stats(raw)
        return ((raw.float() - self.shift - mean) / std * self.scale).to(raw.dtype)

    def invert(self, normalized: torch.Tensor) -> torch.Tensor:
        """diffusion-ready latents -> raw latents, same shape and dtype."""
        mean, std = self._channel_stats(normalized)
        return (normalized.float() / self.scale * std + mean + self.shift).to(normalized.dtype)

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.shift == 0.0 and self.mean is None and self.std is None

    def to_dict(self) -> dict:
        """``scale``, ``shift``, ``mean``, ``std``; ``scalar_fallback`` (``{scaling_factor,
        shift_factor}``) only when the model has one."""
        data = asdict(self)
        fallback = data.pop("scalar_fallback")
        if fallback is not None:
            data["scalar_fallback"] = dict(zip(("scaling_factor", "shift_factor"), fallback, strict=True))
        return data

    @property
    def scalar_pair(self) -> tuple[float, float]:
        """``(scaling_factor, shift_factor)`` as the model's config states them: what a pipeline that
        reads only those two applies, ``(raw - shift_factor) * scaling_factor``."""
        return self.scalar_fallback or (self.scale, self.shift)

    def constants(self) -> dict:
        """The constants under diffusers' names, for people who normalize latents themselves
        (``remote_encode``/``remote_decode`` take ``scaling_factor`` and ``shift_factor``: the
        config's pair, :attr:`scalar_pair`); per-channel ``latents_mean``/``latents_std`` only when
        the model has them."""
        scaling_factor, shift_factor = self.scalar_pair
        constants: dict = {"scaling_factor": scaling_factor, "shift_factor": shift_factor}
        if self.mean is not None:
            constants["latents_mean"] = list(self.mean)
        if self.std is not None:
            constants["latents_std"] = list(self.std)
        return constants

    def describe(self) -> str:
        """One line for tables: ``scale 0.18215``, ``shift 0.1159 scale 0.3611``, ``per-channel
        mean/std, scale 1.0`` (``; scalar fallback shift -1.95 scale 0.23`` when the model has one)."""

        def scalars(scale: float, shift: float) -> str:
            return f"shift {shift} scale {scale}" if shift else f"scale {scale}"

        text = scalars(self.scale, self.shift)
        if self.mean is not None or self.std is not None:
            text = f"per-channel mean/std, {text}"
        if self.scalar_fallback is not None:
            text += f"; scalar fallback {scalars(*self.scalar_fallback)}"
        return text

    @classmethod
    def from_dict(cls, data: dict) -> LatentNormalization:
        mean = data.get("mean")
        std = data.get("std")
        fallback = data.get("scalar_fallback")
        return cls(
            scale=float(data.get("scale", 1.0)),
            shift=float(data.get("shift", 0.0)),
            mean=tuple(float(v) for v in mean) if mean is not None else None,
            std=tuple(float(v) for v in std) if std is not None else None,
            scalar_fallback=(
                None
                if fallback is None
                else (float(fallback["scaling_factor"]), float(fallback.get("shift_factor", 0.0)))
            ),
        )


@dataclass(frozen=True)
class FrameRule:
    """Which frame counts a video tokenizer accepts.

    ``causal=True``: ``1 + k * temporal_compression`` frames (first frame encoded alone, e.g. LTX,
    Wan, Cosmos, Hunyuan, CogVideoX, Mochi use 1 + 4k / 1 + 6k / 1 + 8k). ``causal=False``:
    ``k * temporal_compression`` frames (ViTok tubelets). Images: compression 1, any count.
    """

    temporal_compression: int = 1
    causal: bool = False

    def is_valid(self, frames: int) -> bool:
        t = self.temporal_compression
        if frames < 1:
            return False
        return (frames - 1) % t == 0 if self.causal else frames % t == 0

    def padded_frames(self, frames: int) -> int:
        """Smallest valid frame count >= ``frames``."""
        t = self.temporal_compression
        if self.causal:
            return 1 + math.ceil(max(frames - 1, 0) / t) * t
        return math.ceil(frames / t) * t

    def latent_frames(self, frames: int) -> int:
        """Latent frame count for a valid pixel frame count."""
        t = self.temporal_compression
        return 1 + (frames - 1) // t if self.causal else frames // t

    def pixel_frames(self, latent_frames: int) -> int:
        t = self.temporal_compression
        return 1 + (latent_frames - 1) * t if self.causal else latent_frames * t

    def describe(self) -> str:
        t = self.temporal_compression
        if t == 1:
            return "any"
        return f"1 + {t}k" if self.causal else f"{t}k"


@dataclass(frozen=True)
class QuantizerSpec:
    """A discrete bottleneck: a model config's ``quantizer`` block (FSQ, any family), or the codebook a
    model class has itself (``kind="vq"``: diffusers' ``VQModel``, declared by its backend).

    FSQ (Mentzer et al., "Finite Scalar Quantization: VQ-VAE Made Simple", arXiv 2309.15505): each of
    ``len(levels)`` code channels is bounded and rounded to ``levels[i]`` values. A code vector's
    digits ``d_i`` in ``[0, levels[i])`` give its id in mixed radix, the first channel least
    significant: ``id = sum(d_i * prod(levels[:i]))``, so ids are ``0 .. vocabulary_size - 1``
    (id base 0, dtype int32) and codes -> ids -> codes is exact. ``projection``: a learned per-position
    linear map from the latent channels to ``len(levels)`` code channels and back (required when the
    two differ).

    VQ: a position's code is the nearest of ``n`` learned codebook rows and its id is that row's
    index, so ``levels = (n,)``: the same mixed-radix rule with one digit, which keeps the token
    file, its checks and the vocabulary arithmetic unchanged. codes -> ids -> codes is exact; ids ->
    codes -> ids is exact when the rows are distinct (a duplicated row answers with its lower id).

    ``latents_before_quantization`` says what the model's continuous latents are. False (FSQ): the
    rounded codes projected to the decoder's input, exactly what the ids decode from. True
    (``VQModel``): the encoder's output before quantization, what ``VQModel.encode`` returns and
    latent diffusion trains on; decoding quantizes them first, so latents and ids decode to the
    same pixels.
    """

    kind: str
    levels: tuple[int, ...]
    projection: bool = False
    latents_before_quantization: bool = False

    @property
    def vocabulary_size(self) -> int:
        return math.prod(self.levels)

    @property
    def code_channels(self) -> int:
        return len(self.levels)

    @property
    def bits_per_token(self) -> float:
        return math.log2(self.vocabulary_size)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "levels": list(self.levels),
            "projection": self.projection,
            "vocabulary_size": self.vocabulary_size,
            "bits_per_token": round(self.bits_per_token, 4),
            "id_dtype": ID_DTYPE,
            "id_base": 0,
            "id_order": (
                "the index of the nearest codebook row"
                if self.kind == VQ_KIND
                else "mixed radix over the code channels, the first channel least significant"
            ),
            "codes_ids_exact": True,
            "latents": (
                "before quantization: decode quantizes them to the codes their ids stand for"
                if self.latents_before_quantization
                else "quantized: the codes projected to the decoder's input, what the ids decode from"
            ),
        }

    @classmethod
    def from_config(cls, config: Mapping, latent_channels: int) -> QuantizerSpec | None:
        """The ``quantizer`` block of a model config, validated; None when the model has none."""
        block = config.get("quantizer")
        if block is None:
            return None
        if not isinstance(block, Mapping) or block.get("kind") not in QUANTIZER_KINDS:
            raise ConfigError(
                f"quantizer must be a mapping with kind one of {list(QUANTIZER_KINDS)}, got {block!r}",
                param="quantizer.kind",
            )
        unknown = sorted(set(block) - {"kind", "levels", "projection"})
        if unknown:
            raise ConfigError(
                f"unknown quantizer key {unknown[0]!r}; expected kind, levels, projection",
                param=f"quantizer.{unknown[0]}",
            )
        levels = block.get("levels")
        if not (
            isinstance(levels, (list, tuple))
            and levels
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 2 for v in levels)
            and math.prod(levels) <= MAX_VOCABULARY
        ):
            raise ConfigError(
                f"quantizer.levels must be a non-empty list of integers >= 2 whose product fits int32, "
                f"got {levels!r}",
                param="quantizer.levels",
            )
        projection = block.get("projection", len(levels) != latent_channels)
        if not isinstance(projection, bool):
            raise ConfigError(
                f"quantizer.projection must be true or false, got {projection!r}",
                param="quantizer.projection",
            )
        if not projection and len(levels) != latent_channels:
            raise ConfigError(
                f"quantizer.levels has {len(levels)} entries but the model has {latent_channels} latent "
                "channels; expected as many, or projection: true",
                param="quantizer.levels",
            )
        return cls(kind=block["kind"], levels=tuple(levels), projection=projection)


@dataclass(frozen=True)
class TokenizerSpec:
    """Self-description of a loaded tokenizer (everything a caller needs to use it)."""

    name: str
    family: str
    modality: Modality
    spatial_compression: int
    latent_channels: int
    frame_rule: FrameRule = field(default_factory=FrameRule)
    spatial_multiple: int = 0  # H and W must be multiples of this; 0 means spatial_compression
    normalization: LatentNormalization = field(default_factory=LatentNormalization)
    is_kl: bool = False  # True when encode yields a Gaussian posterior (mean, logvar)
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
    in_channels: int = 3
    # smallest latent height and width the network takes (its normalization layers need more than
    # one value per group at the deepest level); smaller inputs are padded up to :attr:`min_size`
    min_latent_size: int = 1
    quantizer: QuantizerSpec | None = None  # a discrete bottleneck: encode can return token ids

    def with_quantizer(self, config: Mapping) -> TokenizerSpec:
        """This spec plus the config's ``quantizer`` block, if any. A quantized model is
        deterministic: its tokens come from the posterior mean, so ``is_kl`` is False."""
        quantizer = QuantizerSpec.from_config(config, self.latent_channels)
        return self if quantizer is None else replace(self, quantizer=quantizer, is_kl=False)

    @property
    def temporal_compression(self) -> int:
        return self.frame_rule.temporal_compression

    @property
    def multiple(self) -> int:
        return self.spatial_multiple or self.spatial_compression

    @property
    def min_size(self) -> int:
        """Smallest pixel height and width the network takes, a multiple of :attr:`multiple`: the
        Tokenizer pads smaller inputs up to it and crops the padding off again on decode."""
        m = self.multiple
        return math.ceil(self.min_latent_size * self.spatial_compression / m) * m

    @property
    def layout(self) -> str:
        return "NCHW" if self.modality == "image" else "NCTHW"

    def latent_shape(self, pixel_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Latent shape for a *valid* (already padded) pixel shape (N, C, H, W) or (N, C, T, H, W)."""
        f = self.spatial_compression
        if len(pixel_shape) == 4:
            n, _, h, w = pixel_shape
            if self.modality == "video":
                return (n, self.latent_channels, self.frame_rule.latent_frames(1), h // f, w // f)
            return (n, self.latent_channels, h // f, w // f)
        n, _, t, h, w = pixel_shape
        return (n, self.latent_channels, self.frame_rule.latent_frames(t), h // f, w // f)

    @property
    def token_layout(self) -> str:
        """Token ids are the latent grid without its channel axis: ``NHW`` or ``NTHW``."""
        return "NHW" if self.modality == "image" else "NTHW"

    def token_shape(self, pixel_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Token-id shape (N, [t,] h, w) for a valid pixel shape."""
        n, _, *grid = self.latent_shape(pixel_shape)
        return (n, *grid)

    def latent_floats(self, pixel_shape: tuple[int, ...]) -> int:
        """Floats in one item's latent for pixels of ``pixel_shape`` (the budget a baseline gets)."""
        return math.prod(self.latent_shape(pixel_shape)[1:])

    def compression_ratio(self, height: int = 256, width: int = 256, frames: int = 1) -> float:
        """Pixel floats per latent float at the given size (e.g. 48 for SD's f8c4)."""
        if self.modality == "image":
            frames = 1
        frames = self.frame_rule.padded_frames(frames)
        pixels = 3 * frames * height * width
        return pixels / self.latent_floats((1, 3, frames, height, width))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "modality": self.modality,
            "layout": self.layout,
            "spatial_compression": self.spatial_compression,
            "temporal_compression": self.temporal_compression,
            "latent_channels": self.latent_channels,
            "spatial_multiple": self.multiple,
            "min_size": self.min_size,
            "frame_rule": self.frame_rule.describe(),
            "causal": self.frame_rule.causal,
            "normalization": self.normalization.to_dict(),
            "is_kl": self.is_kl,
            "dtypes": list(self.dtypes),
            "in_channels": self.in_channels,
            "compression_ratio_256": round(self.compression_ratio(256, 256, 17), 2),
            **({"tokens": self.describe_tokens()} if self.quantizer is not None else {}),
        }

    def describe_tokens(self) -> dict:
        """What an autoregressive trainer needs: vocabulary, id dtype and base, layout and order."""
        frames = (
            "; latent frame 0 holds the causal first frame alone, each next one "
            f"{self.temporal_compression} frames"
            if self.modality != "image" and self.frame_rule.causal
            else ""
        )
        tokens_256 = math.prod(self.token_shape((1, self.in_channels, 256, 256))[1:])
        return {
            **self.quantizer.to_dict(),
            "layout": self.token_layout,
            "order": f"raster: {'t, ' if self.modality != 'image' else ''}h, w, the last fastest{frames}",
            "tokens_per_256px_image": tokens_256,
            "bits_per_pixel_256": round(tokens_256 * self.quantizer.bits_per_token / 256**2, 5),
        }
