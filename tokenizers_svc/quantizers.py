"""Discrete bottlenecks that turn a family's continuous latents into token ids: FSQ, and
:class:`Codebook`, diffusers' learned VQ codebook behind the same interface.

Finite Scalar Quantization (Mentzer et al., arXiv 2309.15505): each code channel is bounded with a
tanh to just under ``levels[i]`` values and rounded; the rounding passes gradients straight through
in training. There is no codebook to learn, so no commitment or codebook loss is needed and every
code stays reachable. The module sits after a family's encoder and before its decoder, on the raw
latents ``(N, c, [t,] h, w)``:

    raw latents --project_in--> (N, K, ...) --bound, round--> codes in [-1, 1] --project_out--> decoder input
                                                                   |  ^
                                                         codes_to_ids  ids_to_codes (exact, int32)

``K = len(levels)``; the projections are per-position linear maps, present only when the config
asks for them (required when ``K`` differs from the latent channels). Buffers are not saved, so a
quantizer without projections adds nothing to the weights file.

Both quantizers answer the calls the Tokenizer makes (``codes``, ``ids``, ``codes_to_ids``,
``ids_to_codes``, ``latents_from_codes``) and carry their ``spec``, so token ids, token files and
every entry point work the same whichever bottleneck made them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from tokenizers_svc.errors import UnsupportedModelError
from tokenizers_svc.spec import ID_DTYPE, QuantizerSpec

BOUND_EPS = 1e-3  # keeps tanh's range just inside the outermost levels, so rounding never leaves them
NEAREST_ROWS = 4096  # latent positions per distance matrix: 4096 x 8192 rows x 4 bytes = 128 MiB


class _QuantizerLoadFilter(logging.Filter):
    """diffusers' ``from_pretrained`` builds the family's class, which knows neither the config's
    ``quantizer`` block nor the projection weights; it warns that both are ignored. The backend
    attaches the quantizer and loads those weights itself (:func:`load_quantizer_weights`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("quantize" in message and ("will be ignored" in message or "were not used" in message))


for _logger in ("diffusers.configuration_utils", "diffusers.models.modeling_utils"):
    logging.getLogger(_logger).addFilter(_QuantizerLoadFilter())


def _channels_last(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A per-position linear map on the channel axis of (N, C, ...)."""
    return linear(x.movedim(1, -1)).movedim(-1, 1)


class FSQ(nn.Module):
    """Finite scalar quantizer over the channel axis of (N, C, [t,] h, w) latents."""

    def __init__(self, spec: QuantizerSpec, latent_channels: int) -> None:
        super().__init__()
        self.spec = spec
        levels = torch.tensor(spec.levels, dtype=torch.int64)
        radix = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.int64), levels[:-1]]), 0)
        self.register_buffer("levels", levels, persistent=False)  # (K,)
        self.register_buffer("radix", radix, persistent=False)  # (K,): prod(levels[:i])
        self.register_buffer("half_width", levels // 2, persistent=False)  # code q / half_width in [-1, 1]
        k = spec.code_channels
        self.project_in = nn.Linear(latent_channels, k) if spec.projection else None
        self.project_out = nn.Linear(k, latent_channels) if spec.projection else None

    def _view(self, buffer: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
        return buffer.to(dtype).view(1, -1, *([1] * (ndim - 2)))  # (1, K, 1, ...)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """raw latents (N, c, ...) -> codes (N, K, ...) on the grid ``q / (levels // 2)`` in [-1, 1],
        float32; with autograd on, rounding passes gradients straight through."""
        h = _channels_last(self.project_in, z) if self.project_in is not None else z
        h = h.float()
        levels = self._view(self.levels, h.ndim, h.dtype)
        half = (levels - 1) * (1 + BOUND_EPS) / 2
        offset = (1 - levels % 2) * 0.5  # even levels: the grid is shifted by half a step
        shift = torch.atanh(offset / half)
        bounded = torch.tanh(h + shift) * half - offset  # (N, K, ...) in (-L//2 - eps, (L-1)//2 + eps)
        rounded = torch.round(bounded)  # exact grid values: what ids_to_codes gives back
        if rounded.requires_grad or bounded.requires_grad:  # training: straight-through estimator
            rounded = bounded + (rounded - bounded).detach()
        return rounded / self._view(self.half_width, h.ndim, h.dtype)

    def latents_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, K, ...) -> the decoder's input (N, c, ...)."""
        return _channels_last(self.project_out, codes) if self.project_out is not None else codes

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training and decode: raw latents -> (decoder input (N, c, ...), codes (N, K, ...))."""
        codes = self.codes(z)
        return self.latents_from_codes(codes.to(z.dtype)), codes

    def ids(self, z: torch.Tensor) -> torch.Tensor:
        """raw latents (N, c, ...) -> ids (N, ...) int32: their codes' ids."""
        return self.codes_to_ids(self.codes(z))

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, K, ...) -> ids (N, ...) int32 in [0, vocabulary_size), mixed radix."""
        half = self._view(self.half_width, codes.ndim, torch.int64)
        digits = torch.round(codes.float() * half).to(torch.int64) + half  # (N, K, ...) in [0, L)
        ids = (digits * self._view(self.radix, codes.ndim, torch.int64)).sum(dim=1)
        return ids.to(getattr(torch, ID_DTYPE))

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (N, ...) integers in [0, vocabulary_size) -> codes (N, K, ...) float32."""
        wide = ids.to(torch.int64).unsqueeze(1)  # (N, 1, ...)
        ndim = wide.ndim
        digits = (wide // self._view(self.radix, ndim, torch.int64)) % self._view(
            self.levels, ndim, torch.int64
        )
        half = self._view(self.half_width, ndim, torch.int64)
        return (digits - half).float() / half.float()


class Codebook:
    """A learned codebook, diffusers' ``VectorQuantizer`` (``VQModel.quantize``), behind FSQ's interface.

    Codes are codebook rows: ``(N, D, h, w)`` for a ``(n, D)`` codebook, in the space ``VQModel.decode``
    takes. A position's id is the index of the row nearest to it: the argmin of ``torch.cdist`` over
    positions flattened channels-last, as ``VectorQuantizer.forward`` computes it, but always in
    float32 and ``NEAREST_ROWS`` positions at a time. float32, so ids do not depend on the dtype a
    model is served in (bfloat16 distances can pick a neighbouring row, and a row would then not map
    back to its own id); chunked, so the distance matrix stays bounded (all positions of a 1024²
    image at f4 against 8192 rows would be 2 GiB). The rows are read from the module at every call,
    so the adapter follows the module's device, dtype and weights.
    """

    def __init__(self, vector_quantizer: nn.Module, spec: QuantizerSpec) -> None:
        self.spec = spec
        self.embedding: nn.Embedding = vector_quantizer.embedding  # (n, D): the codebook rows

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """codes or any latents (N, D, ...) -> ids (N, ...) int32 in [0, n): each position's nearest row."""
        rows = self.embedding.weight.float()  # (n, D)
        flat = codes.movedim(1, -1).reshape(-1, rows.shape[1]).float()  # (N * h * w, D), raster order
        nearest = [torch.cdist(part, rows).argmin(dim=1) for part in flat.split(NEAREST_ROWS)]
        return torch.cat(nearest).view(codes.shape[0], *codes.shape[2:]).to(getattr(torch, ID_DTYPE))

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (N, ...) integers in [0, n) -> codes (N, D, ...) float32: the rows they index."""
        return self.embedding.weight.float()[ids.long()].movedim(-1, 1)

    def ids(self, z: torch.Tensor) -> torch.Tensor:
        """raw latents (N, D, ...) -> ids (N, ...) int32: one nearest-row search (a latent and its
        nearest row have the same nearest row, so searching again from the codes is not needed)."""
        return self.codes_to_ids(z)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """raw latents (N, D, ...) -> codes (N, D, ...) float32: each position's nearest row."""
        return self.ids_to_codes(self.codes_to_ids(z))

    def latents_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, D, ...) -> the decoder's input: the rows themselves (``VQModel.decode``'s space)."""
        return codes


def build_quantizer(spec: QuantizerSpec, latent_channels: int, seed: int = 0) -> FSQ:
    """The quantizer of ``spec`` with seeded projections (training starts from them; a saved model
    overwrites them with :func:`load_quantizer_weights`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FSQ(spec, latent_channels)


def load_quantizer_weights(quantizer: FSQ, directory: Path) -> None:
    """The projections saved with a model (``quantize.*`` in its safetensors files) into
    ``quantizer``; a quantizer with projections refuses a directory that has none."""
    from safetensors import safe_open

    state = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            names = handle.keys()  # a safe_open handle is not iterable
            for key in names:
                if key.startswith("quantize."):
                    state[key.removeprefix("quantize.")] = handle.get_tensor(key)
    expected = set(quantizer.state_dict())
    if set(state) != expected:
        raise UnsupportedModelError(
            f"model directory {Path(directory).name!r} declares a quantizer with projections but its "
            f"weights hold quantizer tensors {sorted(state)}; expected {sorted(expected)}",
            param="model",
        )
    if expected:
        quantizer.load_state_dict(state)
