"""The :class:`Tokenizer` interface shared by every family (loading lives in :mod:`tokenizers_svc.loading`).

The data path (docs/architecture.md): pixels -> prepare (validate, explicit resize, pad to the
model's constraints, remember the crop) -> encode (tiled/chunked) -> normalize -> :class:`Latents`;
and back: latents -> raw -> decode (tiled/chunked) -> crop to the original size and frame count.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenizers_svc.errors import InvalidRequestError, ShapeMismatchError
from tokenizers_svc.families.base import Backend
from tokenizers_svc.latents import Latents, validate_for, validate_tensor_for
from tokenizers_svc.options import ResizePolicy
from tokenizers_svc.pixels import checked_and_resized, pad_spatial, to_float_pixels, to_uint8_pixels
from tokenizers_svc.spec import TokenizerSpec
from tokenizers_svc.tiling import ChunkCallback, TilingOptions
from tokenizers_svc.tiling import decode as tiled_decode
from tokenizers_svc.tiling import encode as tiled_encode
from tokenizers_svc.tokens import TokenIds, validate_tokens_for


@dataclass(frozen=True)
class Prepared:
    """Pixels ready for the backend plus what decode needs to undo the preparation."""

    # (N, C, H', W') or (N, C, T', H', W'), valid size: float in [-1, 1], or the input's uint8 [0, 255]
    # when it needed no resize or padding (the backend converts it in the model call)
    pixels: torch.Tensor
    original_size: tuple[int, int]  # (H, W) after resize, before padding
    original_frames: int | None
    padding: tuple[int, int, int]  # (bottom rows, right cols, end frames) added
    resized_from: tuple[int, int] | None


class Tokenizer:
    """One interface over every tokenizer family.

    ``encode``: pixels (N, C, H, W) images or (N, C, T, H, W) videos, uint8 [0, 255] or float
    [-1, 1] -> :class:`Latents`. ``decode``: :class:`Latents` (or a bare tensor with an explicit
    ``normalized`` flag) -> pixels cropped back to the original size, float [-1, 1] or uint8.
    """

    def __init__(self, backend: Backend, source: str = "") -> None:
        self.backend = backend
        self.source = source

    @property
    def spec(self) -> TokenizerSpec:
        return self.backend.spec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def module(self) -> torch.nn.Module:
        return self.backend.module

    @property
    def weights_hash(self) -> str:
        return self.backend.weights_hash

    def describe(self) -> dict:
        """The spec plus weights hash, dtype, device and where the model came from, without the
        machine's directories (the server answers ``GET /v1/models`` with it): a model directory is
        named by its last part, a preset or hub id as given."""
        source = Path(self.source)
        return {
            **self.spec.to_dict(),
            "weights_hash": self.weights_hash,
            "source": f"model directory {source.name}" if self.source and source.is_dir() else self.source,
            "dtype": str(self.backend.dtype).removeprefix("torch."),
            "device": str(self.backend.device),
        }

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Tokenizer:
        place_module(self.backend.module, device, dtype)
        self.backend.forget_traced()
        return self

    def prepare(
        self, pixels: torch.Tensor, *, resize: ResizePolicy = "none", resolution: int | None = None
    ) -> Prepared:
        """Validate layout/dtype/range, apply the explicit resize policy, pad to the constraints."""
        spec = self.spec
        if not isinstance(pixels, torch.Tensor):
            raise ShapeMismatchError(
                f"pixels must be a torch.Tensor, got {type(pixels).__name__}", param="pixels"
            )
        if pixels.ndim == 4 and spec.modality == "video":
            pixels = pixels.unsqueeze(2)  # an image is a one-frame clip: (N, C, 1, H, W)
        allowed = {"image": (4,), "video": (5,), "both": (4, 5)}[spec.modality]
        if pixels.ndim not in allowed:
            want = " or ".join(("NCHW", "NCTHW")[r - 4] for r in allowed)
            raise ShapeMismatchError(
                f"{spec.name} ({spec.modality}) expects pixels in {want} layout, got shape {tuple(pixels.shape)}",
                param="pixels",
            )
        if pixels.shape[1] != spec.in_channels:
            raise ShapeMismatchError(
                f"{spec.name} expects {spec.in_channels} channels at dim 1, got {pixels.shape[1]} "
                f"(shape {tuple(pixels.shape)}; layout is channels-first)",
                param="pixels",
            )
        if 0 in pixels.shape:
            raise ShapeMismatchError(
                f"pixels must not be empty, got shape {tuple(pixels.shape)}", param="pixels"
            )
        source_hw = tuple(pixels.shape[-2:])
        x = checked_and_resized(pixels, resize, resolution)  # uint8 stays uint8 (tokenizers_svc/pixels.py)
        h, w = x.shape[-2:]
        pad_h, pad_w = padded_side(h, spec) - h, padded_side(w, spec) - w
        frames = x.shape[2] if x.ndim == 5 else None
        pad_t = spec.frame_rule.padded_frames(frames) - frames if frames is not None else 0
        # uint8 that needs no padding stays uint8: the backend converts it inside its model call
        # (Backend.pixel_moments), traced with the model where the family traces, so a served call
        # does not hand the GIL over and back around each of the conversion's ops
        if x.dtype == torch.uint8 and (pad_h or pad_w or pad_t):
            x = to_float_pixels(x)
        if pad_h or pad_w:
            x = pad_spatial(x, pad_h, pad_w)
        if pad_t:
            x = torch.cat([x, x[:, :, -1:].expand(-1, -1, pad_t, -1, -1)], dim=2)  # repeat last frame
        return Prepared(
            pixels=x,
            original_size=(h, w),
            original_frames=frames,
            padding=(pad_h, pad_w, pad_t),
            resized_from=source_hw if (h, w) != source_hw else None,
        )

    @torch.no_grad()
    def encode(
        self,
        pixels: torch.Tensor,
        *,
        normalize: bool = True,
        sample: bool = False,
        return_posterior: bool = False,
        resize: ResizePolicy = "none",
        resolution: int | None = None,
        tiling: TilingOptions | None = None,
        generator: torch.Generator | None = None,
        fps: float | None = None,
        source_sha256: str | None = None,
        on_chunk: ChunkCallback | None = None,
        tokens: bool = False,
    ) -> Latents | TokenIds:
        """pixels -> Latents. ``sample`` draws from the posterior (KL models); default is its mode.

        ``normalize=True`` gives diffusion-ready latents (the spec's normalization applied),
        ``False`` raw latents; the choice is recorded in the result. ``on_chunk(done, total)``
        follows the temporal chunks of a long clip. ``tokens=True`` (quantized tokenizers only)
        returns :class:`TokenIds` instead: int32 ids, ``(N, [t,] h, w)``.
        """
        if tokens and self.spec.quantizer is None:
            raise InvalidRequestError(
                f"{self.name} is a continuous tokenizer; token ids need a model with a quantizer",
                param="tokens",
            )
        if return_posterior and not self.spec.is_kl:
            raise InvalidRequestError(
                f"{self.name} is deterministic; it has no posterior to return", param="return_posterior"
            )
        prepared = self.prepare(pixels, resize=resize, resolution=resolution)
        x = prepared.pixels.to(self.backend.device)
        if x.is_floating_point():
            x = x.to(self.backend.dtype)
        with self._eval_mode():
            mean, logvar = tiled_encode(self.backend, x, tiling or TilingOptions(), on_chunk)
        mean = mean.float()
        logvar = None if logvar is None else logvar.float()
        z = mean
        if sample and logvar is not None:  # the (tiled) posterior's draw, as diffusers' latent_dist.sample
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # deferred: startup

            z = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1)).sample(generator)
        quantizer = self.backend.quantizer
        if quantizer is not None and tokens:
            return TokenIds(
                ids=quantizer.ids(mean.to(device=self.backend.device, dtype=self.backend.dtype)).cpu(),
                tokenizer=self.name,
                vocabulary_size=self.spec.quantizer.vocabulary_size,
                levels=self.spec.quantizer.levels,
                original_size=prepared.original_size,
                original_frames=prepared.original_frames,
                padding=prepared.padding,
                weights_hash=self.weights_hash,
                fps=fps,
                source_sha256=source_sha256,
                resized_from=prepared.resized_from,
            )
        # latents that are the rounded codes projected to the decoder's input; a model whose latents
        # come before quantization (VQModel: its decode quantizes them) keeps them as encoded
        if quantizer is not None and not self.spec.quantizer.latents_before_quantization:
            codes = quantizer.codes(mean.to(device=self.backend.device, dtype=self.backend.dtype))
            z = quantizer.latents_from_codes(codes.to(self.backend.dtype)).float()
        if normalize:
            z = self.spec.normalization.apply(z)
        return Latents(
            latents=z.cpu(),
            tokenizer=self.name,
            normalized=normalize,
            normalization=self.spec.normalization,
            original_size=prepared.original_size,
            original_frames=prepared.original_frames,
            padding=prepared.padding,
            weights_hash=self.weights_hash,
            mean=mean.cpu() if return_posterior else None,
            logvar=logvar.cpu() if return_posterior and logvar is not None else None,
            fps=fps,
            source_sha256=source_sha256,
            resized_from=prepared.resized_from,
            sampled=bool(sample and logvar is not None),
        )

    @torch.no_grad()
    def latents_from_tokens(self, tokens: TokenIds | torch.Tensor) -> Latents:
        """Token ids (a :class:`TokenIds`, or a bare integer tensor (N, [t,] h, w): nothing to crop)
        -> the raw latents they stand for: codes projected to the decoder's input, with the ids'
        metadata. For FSQ that is exactly what ``encode`` returns for the same pixels; for a model
        whose latents come before quantization (VQModel) it is the codebook rows its decode
        quantizes ``encode``'s latents to, so both decode to the same pixels."""
        quantizer = self.backend.quantizer
        if not isinstance(tokens, TokenIds):
            if quantizer is None:
                raise InvalidRequestError(
                    f"{self.name} is a continuous tokenizer; it decodes float latents, got an integer tensor",
                    param="latents",
                )
            spec = self.spec.quantizer
            tokens = TokenIds(tokens, self.name, spec.vocabulary_size, spec.levels, (1, 1))
            tokens.original_size = tuple(
                int(d) * self.spec.spatial_compression for d in tokens.ids.shape[-2:]
            )
        validate_tokens_for(tokens, self.spec, weights_hash=self.weights_hash)
        codes = quantizer.ids_to_codes(tokens.ids.to(self.backend.device))  # (N, K, [t,] h, w)
        raw = quantizer.latents_from_codes(codes.to(self.backend.dtype)).float().cpu()
        return Latents(
            latents=raw,
            tokenizer=self.name,
            normalized=False,
            normalization=self.spec.normalization,
            original_size=tokens.original_size,
            original_frames=tokens.original_frames,
            padding=tokens.padding,
            weights_hash=tokens.weights_hash,
            fps=tokens.fps,
            source_sha256=tokens.source_sha256,
            resized_from=tokens.resized_from,
        )

    @torch.no_grad()
    def decode(
        self,
        latents: Latents | TokenIds | torch.Tensor,
        *,
        normalized: bool | None = None,
        tiling: TilingOptions | None = None,
        output_dtype: torch.dtype = torch.float32,
        on_chunk: ChunkCallback | None = None,
    ) -> torch.Tensor:
        """Latents or token ids -> pixels (N, C, H, W) / (N, C, T, H, W), cropped to the original size.

        Bare tensors carry no metadata, so no crop is applied; a float tensor needs ``normalized``
        to say which space it is in, an integer tensor is token ids (:meth:`latents_from_tokens`). ``output_dtype``: float32 gives
        [-1, 1], uint8 gives [0, 255]. ``on_chunk(done, total)`` follows the temporal chunks of a
        long clip.
        """
        if isinstance(latents, TokenIds) or (
            isinstance(latents, torch.Tensor) and not latents.is_floating_point()
        ):
            latents = self.latents_from_tokens(latents)
        if isinstance(latents, Latents):
            validate_for(latents, self.spec, weights_hash=self.weights_hash)
            raw = latents.raw()
            crop = latents
        else:
            if normalized is None:
                raise InvalidRequestError(
                    "bare latent tensors need normalized=True or normalized=False", param="normalized"
                )
            validate_tensor_for(latents, self.spec)
            raw = self.spec.normalization.invert(latents) if normalized else latents
            crop = None
        z = raw.to(device=self.backend.device, dtype=self.backend.dtype)
        with self._eval_mode():
            x = tiled_decode(self.backend, z, tiling or TilingOptions(), on_chunk).float().clamp(-1, 1)
        if crop is not None:
            h, w = crop.original_size
            x = x[..., :h, :w]
            if x.ndim == 5 and crop.original_frames is not None:
                x = x[:, :, : crop.original_frames]
        x = x.cpu()
        if output_dtype == torch.uint8:
            return to_uint8_pixels(x)
        if output_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise InvalidRequestError(
                f"output_dtype must be float32 or uint8, got {output_dtype}", param="output_dtype"
            )
        return x.to(output_dtype)

    @contextlib.contextmanager
    def _eval_mode(self):
        """The block runs the module in eval mode; a module in training mode is put back after. One
        already in eval mode (every loaded and served one) is left as it is: ``eval()`` and
        ``train()`` walk every submodule, 1.6 ms of Python per call for the image default (4,440
        attribute sets), held in the thread that runs the model."""
        module = self.backend.module
        if not module.training:
            yield
            return
        module.eval()
        try:
            yield
        finally:
            module.train()


def padded_side(side: int, spec: TokenizerSpec) -> int:
    """The side a pixel height or width is padded to: the next multiple of ``spec.multiple``, and at
    least ``spec.min_size`` (a 1x1 image is padded up to the smallest input the network takes)."""
    m = spec.multiple
    return max(-(-side // m) * m, spec.min_size)


def place_module(module: torch.nn.Module, device, dtype: torch.dtype | None) -> torch.nn.Module:
    """Move, and cast only when the dtype changes (diffusers warns on every ``.to(dtype)`` call)."""
    if device is not None:
        module.to(device=device)
    if dtype is not None and next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module
