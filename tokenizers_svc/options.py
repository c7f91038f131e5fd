"""The encode options as users meet them: one definition of each option's name, default, choices,
command-line spelling and help text.

Three entry points show these options: the CLI (``tokenizers-svc encode``, typer), the HTTP query
(``serving.schemas.EncodeParams``, pydantic, shown on ``/docs``) and the batch job's flags
(``serving.batch``, argparse). Each builds its declarations from :data:`ENCODE_OPTIONS` (the CLI
with :func:`typer_option`'s arguments, the batch job with :func:`add_arguments`, the query model
with :func:`field_doc`), and ``tests/test_options.py`` checks all three against it, so a default
or a help text cannot drift apart. ``pipeline.EncodeOptions.from_flags`` turns the values, named
as here, into the library's options.

Torch-free, so that the CLI's ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

ResizePolicy = Literal["none", "shorter-side", "fit"]
RESIZE_POLICIES: tuple[str, ...] = ("none", "shorter-side", "fit")
MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes

# Tiling defaults (``tiling.TilingOptions``), in pixels and pixel frames.
# 512 px: within the 256-1024 px range the shipped VAEs were trained at, so a tile looks like
# training data; larger tiles trade memory for fewer seams
TILE_SIZE = 512
# 64 px = 8 latent cells at f8, 2 at f32: enough for the cross-fade to hide GroupNorm seams
TILE_OVERLAP = 64
# 33 frames = 1 + 8*4 (8 latent frames at 4x): a valid causal clip for 4x and 8x models
CHUNK_FRAMES = 33


@dataclass(frozen=True)
class Option:
    """One encode option.

    ``name``: the ``EncodeOptions.from_flags`` key, the HTTP query parameter and the argparse dest.
    ``kind``: its value type. ``default``: what leaving it out means (None: the library decides).
    ``flags``: the command line's spelling; for a boolean whose default is True, or a tri-state
    (``tiling``), they are switches that set ``switch_value`` (``--raw`` sets normalize to False).
    ``help``: the option's meaning (CLI, batch job, OpenAPI); ``switch_help``: what a switch does.
    """

    name: str
    kind: type
    default: object
    flags: tuple[str, ...]
    help: str
    choices: tuple[str, ...] | None = None
    switch_value: bool | None = None
    switch_help: str | None = None

    @property
    def is_switch(self) -> bool:
        return self.kind is bool


ENCODE_OPTIONS: dict[str, Option] = {
    o.name: o
    for o in (
        Option(
            "normalize",
            bool,
            True,
            ("--raw", "--no-normalize"),
            "diffusion-ready (normalized) latents, else raw",
            switch_value=False,
            switch_help="store raw latents (no scaling/shift) instead of normalized ones",
        ),
        Option(
            "sample",
            bool,
            False,
            ("--sample",),
            "draw from the posterior; default: its mode",
            switch_value=True,
        ),
        Option("seed", int, None, ("--seed",), f"makes sample reproducible (0 to {MAX_SEED})"),
        Option(
            "return_posterior",
            bool,
            False,
            ("--posterior",),
            "also store the raw posterior mean/logvar",
            switch_value=True,
        ),
        Option(
            "resize",
            str,
            "none",
            ("--resize",),
            "explicit resize before encoding; none never resizes",
            choices=RESIZE_POLICIES,
        ),
        Option(
            "resolution",
            int,
            None,
            ("--resolution",),
            "target side for resize (shorter side, or longer for fit)",
        ),
        Option(
            "tiling",
            bool,
            None,
            ("--no-tiling",),
            "true forces tiling, false disables it; default: tile only inputs larger than one tile",
            switch_value=False,
            switch_help="encode in one pass, without tiles (more memory)",
        ),
        Option(
            "tile_size", int, None, ("--tile-size",), f"spatial tile side in pixels (default {TILE_SIZE})"
        ),
        Option(
            "tile_overlap",
            int,
            None,
            ("--tile-overlap",),
            f"pixels shared by neighbouring tiles (default {TILE_OVERLAP})",
        ),
        Option(
            "chunk_frames",
            int,
            None,
            ("--chunk-frames",),
            f"video frames per temporal chunk (default {CHUNK_FRAMES})",
        ),
        Option("max_frames", int, None, ("--max-frames",), "videos: keep at most this many frames"),
        Option("start", float, None, ("--start",), "videos: start time in seconds"),
        Option("end", float, None, ("--end",), "videos: end time in seconds (exclusive)"),
        Option("stride", int, 1, ("--stride",), "videos: keep every n-th frame"),
        Option(
            "tokens",
            bool,
            False,
            ("--tokens",),
            "int32 token ids instead of latents (quantized tokenizers only)",
            switch_value=True,
        ),
    )
}


def cli_help(option: Option) -> str:
    """The help text of the option's command-line flag."""
    return option.switch_help or option.help


def typer_option(name: str) -> tuple[object, tuple[str, ...], str]:
    """(default, flags, help) of ``name``'s command-line flag, for ``typer.Option(default, *flags,
    help=help)``: a switch defaults to False (it is either given or not)."""
    option = ENCODE_OPTIONS[name]
    default = False if option.is_switch else option.default
    return default, option.flags, cli_help(option)


def add_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """Declare the options ``names`` on an argparse parser (dest = the option's name)."""
    for name in names:
        option = ENCODE_OPTIONS[name]
        if option.is_switch:
            action = "store_false" if option.switch_value is False else "store_true"
            parser.add_argument(*option.flags, dest=name, action=action, help=cli_help(option))
            parser.set_defaults(**{name: option.default})
        else:
            parser.add_argument(
                *option.flags,
                dest=name,
                type=option.kind,
                default=option.default,
                choices=option.choices,
                help=option.help,
            )


def field_doc(name: str) -> dict:
    """``default`` and ``description`` of the HTTP query parameter ``name`` (``pydantic.Field``)."""
    option = ENCODE_OPTIONS[name]
    return {"default": option.default, "description": option.help}
