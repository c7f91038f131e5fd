"""ViTok's network: a Vision-Transformer auto-encoder for images and videos, native implementation.

The backend and presets live in :mod:`tokenizers_svc.families.vitok`, which the registry imports on
every start; this module (diffusers' ModelMixin) is imported only when a ViTok model is built.

Paper: Hansen-Estruch et al., "Learnings from Scaling Visual Tokenizers for Reconstruction and
Generation" (arXiv 2501.09755). The input is cut into ``p x p`` patches (images) or ``q x p x p``
tubelets (videos), a small Llama-style encoder (RMSNorm, SwiGLU, axial rotary positions) maps the
tokens to ``c`` channels each (the bottleneck: ``E = (T/q)(H/p)(W/p) * c`` floats), and a larger
Llama-style decoder maps them back to pixels. The paper's finding is to scale the decoder, not the
encoder, so both sides have their own width and depth.

Layouts at the boundary (the :class:`~tokenizers_svc.families.base.Backend` contract):

- pixels: images ``(N, C, H, W)``, videos ``(N, C, T, H, W)``, float in [-1, 1], ``H, W`` multiples
  of ``p`` and ``T`` a multiple of ``q``;
- latents: the token grid reshaped channels-first, ``(N, c, H/p, W/p)`` for images and
  ``(N, c, T/q, H/p, W/p)`` for videos, so generic padding, tiling and latent files work unchanged.

Rotary positions are computed from the token grid of each input, so one model runs at any
resolution and frame count (no learned position table to interpolate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution, EncoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from tokenizers_svc.errors import ShapeMismatchError


def axial_rope_dims(head_dim: int, axes: int) -> int:
    """Rotary channels per axis: the largest even number with ``axes * dims <= head_dim``.

    Leftover channels (``head_dim - axes * dims``) are left unrotated.
    """
    dims = (head_dim // axes) // 2 * 2
    if dims < 2:
        raise ValueError(f"head_dim {head_dim} is too small for {axes}-axis rotary positions")
    return dims


def axial_rope_tables(
    grid: tuple[int, ...], head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (L, axes * dims/2) for a token grid ``grid`` = (h, w) or (t, h, w), row-major."""
    dims = axial_rope_dims(head_dim, len(grid))
    inv_freq = theta ** (-torch.arange(0, dims, 2, device=device, dtype=torch.float32) / dims)  # (dims/2,)
    coords = torch.meshgrid(
        *[torch.arange(n, device=device, dtype=torch.float32) for n in grid], indexing="ij"
    )
    angles = torch.cat([c.reshape(-1, 1) * inv_freq for c in coords], dim=-1)  # (L, axes * dims/2)
    return angles.cos(), angles.sin()


def apply_axial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (N, heads, L, head_dim) by per-axis angles; each axis owns a contiguous channel block."""
    half = cos.shape[-1]  # axes * dims/2 rotation pairs
    rotated, rest = x[..., : 2 * half], x[..., 2 * half :]
    pairs = rotated.float().unflatten(-1, (half, 2))  # (N, heads, L, half, 2): adjacent channel pairs
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return torch.cat((out.to(x.dtype), rest), dim=-1)


class SwiGLU(nn.Module):
    """Llama feed-forward: ``W2(silu(W1 x) * W3 x)``, no biases."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with axial rotary positions on q and k."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_axial_rope(q, cos, sin), apply_axial_rope(k, cos, sin)  # (N, heads, L, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, width))


class Block(nn.Module):
    """Pre-norm Llama block: ``x + attn(norm(x))``, then ``x + swiglu(norm(x))``."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.norm2 = nn.RMSNorm(width, eps=eps)
        self.mlp = SwiGLU(width, mlp_hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        hidden = round(width * mlp_ratio)
        self.blocks = nn.ModuleList([Block(width, heads, hidden, eps) for _ in range(depth)])
        self.norm = nn.RMSNorm(width, eps=eps)
        self.head_dim = width // heads
        self.gradient_checkpointing = False  # set by ModelMixin.enable_gradient_checkpointing()

    def forward(self, x: torch.Tensor, grid: tuple[int, ...], theta: float) -> torch.Tensor:
        cos, sin = axial_rope_tables(grid, self.head_dim, theta, x.device)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, cos, sin)  # recompute in backward
            else:
                x = block(x, cos, sin)
        return self.norm(x)


class ViTokModel(ModelMixin, ConfigMixin):
    """ViTok auto-encoder. ``encode``/``decode`` use the channels-first latent grid (module docstring)."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        modality: str = "image",  # "image": NCHW, p x p patches; "video": NCTHW, q x p x p tubelets
        patch_size: int = 16,  # p: spatial compression (paper: 16 at 256p)
        tubelet_size: int = 1,  # q: temporal compression; 1 for images, 4 in the paper's video models
        latent_channels: int = 16,  # c: bottleneck channels per token; 16 gives E = 4096 floats at 256p, p=16
        encoder_width: int = 384,  # S = ViT-Small: the paper keeps the encoder small
        encoder_depth: int = 12,
        encoder_heads: int = 6,
        decoder_width: int = 768,  # B = ViT-Base; L = 1024 wide, 24 deep, 16 heads
        decoder_depth: int = 12,
        decoder_heads: int = 12,
        mlp_ratio: float = 3.5,  # SwiGLU hidden = 3.5 d: Llama's 2/3 * 4d * 1.3 rounded; gives 129.0M for S-B/16
        variational: bool = True,  # KL bottleneck (mean, logvar); False = plain auto-encoder
        rope_theta: float = 10000.0,  # rotary base, as in Llama
        norm_eps: float = 1e-6,
        scaling_factor: float = 1.0,  # latent normalization, measured on data after training
        shift_factor: float = 0.0,
    ) -> None:
        super().__init__()
        if modality not in ("image", "video"):
            raise ValueError(f"modality must be 'image' or 'video', got {modality!r}")
        if modality == "image" and tubelet_size != 1:
            raise ValueError(f"image ViTok needs tubelet_size=1, got {tubelet_size}")
        self.is_video = modality == "video"
        tokens_in = in_channels * tubelet_size * patch_size * patch_size  # floats per patch/tubelet
        self.patch_embed = nn.Linear(tokens_in, encoder_width)
        self.encoder = Transformer(encoder_width, encoder_depth, encoder_heads, mlp_ratio, norm_eps)
        self.to_latent = nn.Linear(encoder_width, latent_channels * (2 if variational else 1))
        self.from_latent = nn.Linear(latent_channels, decoder_width)
        self.decoder = Transformer(decoder_width, decoder_depth, decoder_heads, mlp_ratio, norm_eps)
        self.to_pixels = nn.Linear(decoder_width, tokens_in)
        self.apply(_init_weights)

    # ------------------------------------------------------------------------------ patching

    def _grid(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Token grid (h, w) or (t, h, w) for a pixel shape, refusing sizes the patching cannot tile."""
        cfg = self.config
        p, q = cfg.patch_size, cfg.tubelet_size
        want_rank = 5 if self.is_video else 4
        if len(shape) != want_rank or shape[1] != cfg.in_channels:
            layout = "NCTHW" if self.is_video else "NCHW"
            raise ShapeMismatchError(
                f"ViTok ({cfg.modality}) expects {layout} pixels with {cfg.in_channels} channels, got {tuple(shape)}"
            )
        spatial = shape[-2:]
        if spatial[0] % p or spatial[1] % p or (self.is_video and shape[2] % q):
            raise ShapeMismatchError(
                f"ViTok needs H, W multiples of {p}"
                + (f" and T a multiple of {q}" if self.is_video else "")
                + f", got {tuple(shape)}"
            )
        if self.is_video:
            return (shape[2] // q, spatial[0] // p, spatial[1] // p)
        return (spatial[0] // p, spatial[1] // p)

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(N, C, [T,] H, W) -> tokens (N, L, C*q*p*p), L = [T/q *] H/p * W/p, and the grid."""
        grid = self._grid(tuple(x.shape))
        p, q = self.config.patch_size, self.config.tubelet_size
        n, c = x.shape[:2]
        if not self.is_video:
            h, w = grid
            x = x.reshape(n, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5)  # (N, h, w, C, p, p)
            return x.reshape(n, h * w, c * p * p), grid
        t, h, w = grid
        x = x.reshape(n, c, t, q, h, p, w, p).permute(0, 2, 4, 6, 1, 3, 5, 7)  # (N, t, h, w, C, q, p, p)
        return x.reshape(n, t * h * w, c * q * p * p), grid

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """tokens (N, L, C*q*p*p) -> pixels (N, C, [T,] H, W); inverse of :meth:`patchify`."""
        p, q, c = self.config.patch_size, self.config.tubelet_size, self.config.in_channels
        n = tokens.shape[0]
        if not self.is_video:
            h, w = grid
            x = tokens.reshape(n, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5)  # (N, C, h, p, w, p)
            return x.reshape(n, c, h * p, w * p)
        t, h, w = grid
        x = tokens.reshape(n, t, h, w, c, q, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)  # (N, C, t, q, h, p, w, p)
        return x.reshape(n, c, t * q, h * p, w * p)

    # ------------------------------------------------------------------------------ encode / decode

    def encode(self, x: torch.Tensor) -> AutoencoderKLOutput | EncoderOutput:
        """pixels (N, C, [T,] H, W) float [-1, 1] -> as diffusers' autoencoders answer: variational, an
        ``AutoencoderKLOutput`` whose ``latent_dist`` (``DiagonalGaussianDistribution``: mean and logvar
        clamped to [-30, 20], each (N, c, [t,] h, w)) samples itself; plain, an ``EncoderOutput`` whose
        ``latent`` is (N, c, [t,] h, w)."""
        tokens, grid = self.patchify(x)  # (N, L, C*q*p*p)
        h = self.encoder(self.patch_embed(tokens), grid, self.config.rope_theta)  # (N, L, D_enc)
        moments = self.to_latent(h)  # (N, L, 2c) or (N, L, c)
        moments = moments.transpose(1, 2).unflatten(2, grid)  # (N, 2c | c, [t,] h, w)
        if not self.config.variational:
            return EncoderOutput(latent=moments)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(moments))  # mean, logvar halves

    def decode(self, z: torch.Tensor) -> DecoderOutput:
        """latents (N, c, [t,] h, w) -> ``DecoderOutput``: ``sample`` pixels (N, C, [T,] H, W) float,
        nominally [-1, 1]."""
        cfg = self.config
        want_rank = 5 if self.is_video else 4
        if z.ndim != want_rank or z.shape[1] != cfg.latent_channels:
            raise ShapeMismatchError(
                f"ViTok expects latents (N, {cfg.latent_channels}, {'t, ' if self.is_video else ''}h, w), "
                f"got {tuple(z.shape)}"
            )
        grid = tuple(z.shape[2:])
        tokens = z.flatten(2).transpose(1, 2)  # (N, L, c)
        h = self.decoder(self.from_latent(tokens), grid, cfg.rope_theta)  # (N, L, D_dec)
        return DecoderOutput(sample=self.unpatchify(self.to_pixels(h), grid))  # (N, C, [T,] H, W)

    def forward(
        self, sample: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None
    ) -> DecoderOutput:
        """Reconstruction, as diffusers' ``AutoencoderKL.forward``: pixels -> ``DecoderOutput`` of the
        posterior's mode, or of a draw from it when ``sample_posterior``."""
        encoded = self.encode(sample)
        if not hasattr(encoded, "latent_dist"):
            return self.decode(encoded.latent)
        posterior = encoded.latent_dist
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode())


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
