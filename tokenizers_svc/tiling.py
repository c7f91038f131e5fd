"""Spatial tiling and temporal chunking with overlap blending, for every backend.

Works on padded, constraint-satisfying inputs and raw latents, calling only the backend's
``inference_moments``/``inference_pixels`` (``pixel_moments``/``decode_latents``, traced
per hot shape where the family opted in), so peak model memory is bounded by one tile (one spatial
tile of one temporal chunk) whatever the family; only the (small) output is held whole.

**Spatial tiling.** Tile sides and overlaps are rounded to ``align = lcm(spec.multiple,
spatial_compression)`` pixels, so every tile is a valid input and every tile border falls on a
latent border (pixel offset ``p`` <-> latent offset ``p / f``). Tiles are spread evenly over the
image; the last one ends exactly at the border, so neighbours share *at least* ``tile_overlap``
pixels. Encode tiles pixels and blends the overlapping *latent* cells; decode tiles latents
(``tile_size / f`` cells, ``tile_overlap / f`` shared) and blends the overlapping *pixels*.

**Blending.** Each tile's weight is the outer product of 1-D linear ramps over the whole region it
shares with each neighbour (``(k + 0.5) / shared`` rising, its mirror falling, so two neighbours'
weights sum to one everywhere they overlap), 1 elsewhere; outputs are accumulated with their
weights and divided by the summed weight. For KL models the posterior ``mean`` and ``logvar`` are
blended with the same weights (the ``logvar`` blend is the weighted geometric mean of variances),
so a sample drawn from the blended posterior is consistent with its blended mode.

**Temporal chunking** follows the model's :class:`~tokenizers_svc.spec.FrameRule`
(``t`` = temporal compression):

- *causal* (``1 + k t`` frames -> ``1 + k`` latent frames; latent 0 encodes frame 0 alone, latent
  ``i >= 1`` encodes frames ``(i-1) t + 1 .. i t``): the ``k`` latent groups are split into spans
  of ``b`` groups (``chunk_frames = 1 + b t``) sharing ``o`` groups (``o = chunk_overlap / t``
  rounded up). A span of groups ``[s, e)`` is encoded from pixel frames ``[s t, e t + 1)``, a valid
  ``1 + (e - s) t`` clip whose first frame is the *last* frame of group ``s``; it yields latents
  ``s .. e``. For ``s > 0`` its first latent is an image-style encoding of that single frame, not
  of the group, so it gets weight 0 and latents ``s+1 .. e`` are kept; chunk 0 keeps latent 0.
  Decode mirrors this: latents ``[s, e]`` decode to frames ``[s t, e t + 1)`` and, for ``s > 0``,
  the first decoded frame (a one-latent "image" decode) gets weight 0.
- *non-causal* (``k t`` frames, e.g. tubelets): chunks of ``c t`` frames sharing ``o t`` frames map
  1:1 onto latent spans of ``c`` frames sharing ``o``.

Backends whose model already streams frame groups through a causal cache (``streams_frames =
True``: Wan, CogVideoX) are never chunked in time: their own streaming is exact and bounds memory
by one group; they are still tiled spatially.

**Error.** Tiling is exact only for models with a receptive field smaller than the overlap and no
global operations. Real VAEs have GroupNorm statistics over the tile, mid-block self-attention and
deep receptive fields, and causal video encoders carry state from the start of the clip (the
diffusers Wan/CogVideoX/Mochi encoders stream with a frame cache; a chunk restarts it from its first
frame), so chunk/tile seams differ slightly from the whole-input result. The overlap cross-fade
hides the seams; the measured tiled-vs-untiled PSNR per backend is in ``docs/backends.md`` and is
asserted by ``tests/test_tiling.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tokenizers_svc.abandon import checkpoint
from tokenizers_svc.errors import InvalidRequestError
from tokenizers_svc.families.base import Backend
from tokenizers_svc.options import CHUNK_FRAMES, TILE_OVERLAP, TILE_SIZE
from tokenizers_svc.spec import TokenizerSpec

ChunkCallback = Callable[[int, int], None]  # (temporal chunks done, chunks in all): progress of long clips

Moments = tuple[torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class TilingOptions:
    """``enabled=None`` tiles only inputs larger than one tile; True forces, False disables.

    Sizes are in *pixels* (and pixel frames) for both encode and decode, so one option set means
    the same tile grid in both directions.
    """

    enabled: bool | None = None
    tile_size: int = TILE_SIZE  # the sizes' reasons: tokenizers_svc/options.py
    tile_overlap: int = TILE_OVERLAP
    chunk_frames: int = CHUNK_FRAMES
    # 8 frames = 2 latent frames at 4x shared (and cross-faded) between neighbouring chunks
    chunk_overlap: int = 8

    def __post_init__(self) -> None:
        for name, low in (("tile_size", 1), ("tile_overlap", 0), ("chunk_frames", 1), ("chunk_overlap", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidRequestError(f"{name} must be an integer >= {low}, got {value!r}", param=name)


def tiling_options(
    enabled: bool | None = None,
    tile_size: int | None = None,
    tile_overlap: int | None = None,
    chunk_frames: int | None = None,
) -> TilingOptions | None:
    """User-facing tiling flags (CLI, HTTP) -> options; None when nothing was asked for (the
    Tokenizer then uses ``TilingOptions()``). Sizes left out keep TilingOptions' defaults."""
    sizes = {"tile_size": tile_size, "tile_overlap": tile_overlap, "chunk_frames": chunk_frames}
    given = {name: value for name, value in sizes.items() if value is not None}
    if enabled is None and not given:
        return None
    return TilingOptions(enabled=enabled, **given)


@dataclass(frozen=True)
class _Grid:
    """A model's tile/chunk geometry for one options set (pixel and latent units)."""

    align: int  # pixels; tile borders are multiples of this (and so latent borders)
    tile: int  # pixels per tile side, multiple of align
    overlap: int  # pixels shared by neighbours, multiple of align, < tile
    f: int  # spatial compression
    t: int  # temporal compression
    causal: bool
    chunk: int  # latent frames per chunk *excluding* a causal chunk's first (context) latent
    chunk_overlap: int  # latent frames shared by neighbouring chunks, < chunk

    @classmethod
    def build(cls, spec: TokenizerSpec, options: TilingOptions) -> _Grid:
        f = spec.spatial_compression
        align = math.lcm(spec.multiple, f)
        smallest = math.ceil(spec.min_size / align) * align  # a tile is an input the network takes
        tile = max(smallest, options.tile_size // align * align)
        overlap = min(tile - align, math.ceil(options.tile_overlap / align) * align)
        rule = spec.frame_rule
        t = rule.temporal_compression
        chunk = max(1, (options.chunk_frames - 1) // t if rule.causal else options.chunk_frames // t)
        chunk_overlap = min(chunk - 1, math.ceil(options.chunk_overlap / t))
        return cls(align, tile, overlap, f, t, rule.causal, chunk, chunk_overlap)


def _spans(length: int, tile: int, overlap: int, align: int) -> list[tuple[int, int]]:
    """Cover ``[0, length)`` with spans of ``min(tile, length)`` starting on multiples of ``align``,
    spread evenly, neighbours sharing >= ``overlap``; ``length``, ``tile``, ``overlap`` are multiples
    of ``align`` and ``overlap < tile``."""
    if length <= tile:
        return [(0, length)]
    count = 1 + math.ceil((length - tile) / (tile - overlap))
    step = (length - tile) / (count - 1)
    starts = [int(i * step) // align * align for i in range(count - 1)] + [length - tile]
    return [(s, s + tile) for s in starts]


def _ramps(valid: list[tuple[int, int]]) -> list[torch.Tensor]:
    """1-D blend weights for each valid span: linear cross-fades over each region shared with the
    previous/next span (weights of two neighbours sum to 1 there), 1 elsewhere; never 0."""
    weights = []
    for i, (start, end) in enumerate(valid):
        w = torch.ones(end - start)
        if i > 0 and (shared := min(valid[i - 1][1], end) - start) > 0:
            w[:shared] *= (torch.arange(shared) + 0.5) / shared
        if i + 1 < len(valid) and (shared := end - max(valid[i + 1][0], start)) > 0:
            w[-shared:] *= (torch.arange(shared, 0, -1) - 0.5) / shared
        weights.append(w)
    return weights


class _Job(NamedTuple):
    """One tile/chunk: slices over the trailing dims of the input, of the tile's output, and of the
    full output, plus the blend weight (broadcastable over the output's trailing dims)."""

    source: tuple[slice, ...]
    crop: tuple[slice, ...]
    target: tuple[slice, ...]
    weight: torch.Tensor


def _blend(
    fn: Callable[[torch.Tensor], tuple],
    x: torch.Tensor,
    jobs: list[_Job],
    sizes: tuple,
    on_job: ChunkCallback | None = None,
) -> tuple:
    """Run ``fn`` on each job's slice of ``x`` and blend the outputs (a tuple of tensors or None)
    into full-size float32 tensors; ``sizes`` are the output's trailing sizes (None: as the tile's).
    ``on_job(done, total)`` is called after each job."""
    outputs: list[torch.Tensor | None] = []
    total = torch.zeros(0)
    for n, job in enumerate(jobs):
        checkpoint()  # an abandoned request stops here, between tiles/chunks
        pieces = [None if p is None else p[(..., *job.crop)] for p in fn(x[(..., *job.source)])]
        if n == 0:
            ref = pieces[0]
            trailing = ref.shape[ref.ndim - len(sizes) :]
            full = tuple(s if s is not None else trailing[i] for i, s in enumerate(sizes))
            outputs = [
                None
                if p is None
                else p.new_zeros((*p.shape[: p.ndim - len(sizes)], *full), dtype=torch.float32)
                for p in pieces
            ]
            total = torch.zeros(tuple(s if s is not None else 1 for s in sizes), device=ref.device)
        weight = job.weight.to(total.device)
        for out, piece in zip(outputs, pieces, strict=True):
            if out is not None:
                out[(..., *job.target)] += piece.float() * weight
        total[job.target] += weight
        if on_job is not None:
            on_job(n + 1, len(jobs))
    return tuple(None if out is None else out / total for out in outputs)


def _spatial_jobs(height: int, width: int, grid: _Grid, encoding: bool) -> tuple[list[_Job], tuple[int, int]]:
    """Tiles over (H, W) pixels (encoding) or (h, w) latents (decoding), with output sizes."""
    f = grid.f
    if encoding:
        tile, overlap, align = grid.tile, grid.overlap, grid.align
    else:
        tile, overlap, align = grid.tile // f, grid.overlap // f, max(1, grid.align // f)
    axes = []
    for length in (height, width):
        inputs = _spans(length, tile, overlap, align)
        outputs = [(s // f, e // f) if encoding else (s * f, e * f) for s, e in inputs]
        axes.append(list(zip(inputs, outputs, _ramps(outputs), strict=True)))
    jobs = [
        _Job(
            source=(slice(*ih), slice(*iw)),
            crop=(slice(None), slice(None)),
            target=(slice(*oh), slice(*ow)),
            weight=wh[:, None] * ww[None, :],
        )
        for ih, oh, wh in axes[0]
        for iw, ow, ww in axes[1]
    ]
    return jobs, (axes[0][-1][1][1], axes[1][-1][1][1])


def _temporal_jobs(groups: int, grid: _Grid, encoding: bool) -> tuple[list[_Job], int]:
    """Chunks over ``groups`` latent groups (see the module docstring), with the output frame count.

    Causal: group span ``[s, e)`` <-> latents ``[s, e]`` <-> pixel frames ``[s t, e t + 1)``; for
    ``s > 0`` the first latent/frame is context only. Non-causal: latents ``[s, e)`` <-> frames
    ``[s t, e t)``."""
    t, causal = grid.t, grid.causal
    chunks = []
    for s, e in _spans(groups, grid.chunk, grid.chunk_overlap, 1):
        latent = (s, e + 1) if causal else (s, e)
        pixel = (s * t, e * t + 1) if causal else (s * t, e * t)
        drop = int(causal and s > 0)  # the context latent, or the single frame it decodes to
        source, out = (pixel, latent) if encoding else (latent, pixel)
        chunks.append((source, out, (out[0] + drop, out[1])))
    weights = _ramps([valid for _, _, valid in chunks])
    jobs = [
        _Job(
            source=(slice(*source), slice(None), slice(None)),
            crop=(slice(valid[0] - out[0], valid[1] - out[0]), slice(None), slice(None)),
            target=(slice(*valid), slice(None), slice(None)),
            weight=w[:, None, None],
        )
        for (source, out, valid), w in zip(chunks, weights, strict=True)
    ]
    return jobs, chunks[-1][1][1]


def _groups(frames: int, grid: _Grid, encoding: bool) -> int:
    """Latent groups (chunkable units) in a clip of ``frames`` pixel frames / latent frames."""
    if grid.causal:
        return (frames - 1) // grid.t if encoding else frames - 1
    return frames // grid.t if encoding else frames


def _run(
    fn: Callable[[torch.Tensor], tuple],
    x: torch.Tensor,
    grid: _Grid,
    enabled: bool | None,
    encoding: bool,
    chunk_time: bool,
    on_chunk: ChunkCallback | None = None,
) -> tuple:
    """Temporal chunks (5-D input, when ``chunk_time``) of spatial tiles of ``fn``; pass-through
    when nothing to split. ``on_chunk(done, total)`` follows the temporal chunks."""
    checkpoint()
    if enabled is False:
        return fn(x)
    in_tile = grid.tile if encoding else grid.tile // grid.f

    def spatial(chunk: torch.Tensor) -> tuple:
        height, width = chunk.shape[-2:]
        if enabled is None and height <= in_tile and width <= in_tile:
            return fn(chunk)
        jobs, sizes = _spatial_jobs(height, width, grid, encoding)
        return _blend(fn, chunk, jobs, sizes)

    if x.ndim == 5 and chunk_time:
        groups = _groups(x.shape[2], grid, encoding)
        if groups > 0 and (enabled or groups > grid.chunk):
            jobs, frames = _temporal_jobs(groups, grid, encoding)
            return _blend(spatial, x, jobs, (frames, None, None), on_chunk)
    return spatial(x)


def encode(
    backend: Backend, x: torch.Tensor, options: TilingOptions, on_chunk: ChunkCallback | None = None
) -> Moments:
    """x: padded pixels (N, C, H, W) / (N, C, T, H, W), float [-1, 1], or uint8 [0, 255] that the
    backend converts in its model call (``Backend.pixel_moments``) -> raw (mean, logvar|None).

    Tiled/chunked outputs are float32; a pass-through keeps the backend's dtype."""
    grid = _Grid.build(backend.spec, options)

    def encode_tile(chunk: torch.Tensor) -> Moments:
        return tuple(backend.inference_moments(chunk))

    mean, logvar = _run(encode_tile, x, grid, options.enabled, True, _chunks_time(backend), on_chunk)
    return mean, logvar


def decode(
    backend: Backend, z: torch.Tensor, options: TilingOptions, on_chunk: ChunkCallback | None = None
) -> torch.Tensor:
    """z: raw latents (N, c, h, w) / (N, c, t, h, w) -> padded pixels float, nominally [-1, 1]."""
    grid = _Grid.build(backend.spec, options)

    def decode_tile(chunk: torch.Tensor) -> tuple[torch.Tensor]:
        return (backend.inference_pixels(chunk),)

    (pixels,) = _run(decode_tile, z, grid, options.enabled, False, _chunks_time(backend), on_chunk)
    return pixels


def _chunks_time(backend: Backend) -> bool:
    """False for backends that declare ``streams_frames = True``: their model already runs one frame
    group at a time with a causal cache (exact, memory bounded by a group), so chunking would only
    add seams."""
    return not backend.streams_frames
