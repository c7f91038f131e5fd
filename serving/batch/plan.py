"""What a batch job will do, decided on the driver before any work: the inputs, the model, the options.

A :class:`JobPlan` travels to every task and actor; its :meth:`JobPlan.key` (model, weights, options)
goes into every row id and into ``job.json``, so a rerun of the same command recognizes its rows.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenizers_svc.api import Tokenizer
from tokenizers_svc.errors import ConfigError, TokenizerError
from tokenizers_svc.formats import is_media_file
from tokenizers_svc.limits import Limits
from tokenizers_svc.loading import load_tokenizer, resolved_dtype
from tokenizers_svc.manifests import read_manifest
from tokenizers_svc.pipeline import EncodeOptions
from tokenizers_svc.pixels import MODEL_INPUT_RESIZE, bucket_sizes
from tokenizers_svc.spec import FrameRule

DEFAULT_CLIP_FRAMES = 16  # rounded up to the model's frame rule (17 for 1 + 4k / 1 + 8k models)
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16 on a GPU, float32 on a CPU


@dataclass(frozen=True)
class JobPlan:
    """Everything the workers need, validated on the driver before any work."""

    model: str  # as given: preset name or model directory
    model_name: str
    weights_hash: str
    modality: str  # of the model: image | video | both
    frame_rule: FrameRule
    options: EncodeOptions
    clip_frames: int
    device: str
    dtype: str
    limits: Limits = field(default_factory=Limits)  # per input; not in key(): it changes no latents
    crop: str = "none"  # none | center | random: each item resized to cover its crop size, then cropped
    crop_sizes: tuple[tuple[int, int], ...] = ()  # (H, W): one fixed size, or the aspect-ratio buckets
    tokens: dict | None = None  # --tokens: the model's token description (vocabulary, levels, order)

    def key(self) -> dict:
        """What determines a row's latents; part of every id and of job.json."""
        options = asdict(self.options)
        options.pop("tiling")
        if not options["tokens"]:  # absent for latents, so directories written before --tokens resume
            options.pop("tokens")
        key = {
            "model": self.model_name,
            "weights_hash": self.weights_hash,
            "options": options,
            "clip_frames": self.clip_frames,
            "dtype": self.dtype,
        }
        if self.crop != "none":  # absent otherwise, so directories written before --crop still resume
            key["crop"] = {"mode": self.crop, "sizes": [list(size) for size in self.crop_sizes]}
        if self.crop != "none" or self.options.resize != "none":
            # absent otherwise: pixels that are not resized do not depend on it
            key["model_input_resize"] = MODEL_INPUT_RESIZE
        return key


def digest(value: object) -> str:
    """Stable 32-hex-digit id of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]


def row_id(plan_key: dict, path: str, clip: tuple[int, int] | None) -> str:
    return digest({"path": path, "clip": list(clip) if clip else None, **plan_key})


def error_text(exc: TokenizerError) -> str:
    """A library error as the row's ``error`` field: ``type: message``."""
    return f"{exc.type}: {exc.message}"


def path_text(path: str) -> str:
    """A path as valid UTF-8 text for display and the ``source_path`` column: bytes that are not
    UTF-8 show as U+FFFD; the exact bytes travel in ``source_path_bytes``."""
    return os.fsencode(path).decode("utf-8", "replace")


def _classify(path: Path) -> str | None:
    """None for a readable media file; else why the listing ignores this entry."""
    try:
        mode = path.stat().st_mode  # follows symlinks
    except OSError as exc:  # a symlink loop, a dangling link, no permission
        return f"cannot stat: {exc.strerror or type(exc).__name__}"
    if stat.S_ISDIR(mode):
        return "a directory with a media suffix" if is_media_file(path) else None
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return None if is_media_file(path) else "not a media file suffix"


def _walk(root: Path) -> list[Path]:
    """Every entry under ``root`` (links to directories are listed, not followed: no cycles)."""
    entries = []
    for directory, dirs, files in os.walk(root):
        entries.extend(Path(directory, name) for name in (*dirs, *files))
    return entries


def list_inputs(spec: str) -> tuple[list[str], list[dict]]:
    """DIR (recursive, media suffixes), GLOB, or a Parquet manifest with a ``path`` column ->
    (sorted absolute input paths, ignored entries as ``{"path", "reason"}``). Every entry the
    listing sees is one or the other (plain directories are only walked): an empty manifest row,
    and a second name for a file already listed (a repeated row, a link), are ignored with the
    reason. Manifest paths are relative to it and otherwise all kept: one that cannot be read
    becomes an error row."""
    path = Path(spec)
    ignored: list[dict] = []
    first: dict[str, str] = {}  # input -> how it was first listed (a manifest row, a path)
    if path.is_file() and path.suffix == ".parquet":
        for row, (listed, absolute) in enumerate(read_manifest(path, param="input")):
            if not listed:
                ignored.append({"path": "", "reason": f"empty path in row {row} of {path.name}"})
                continue
            if absolute in first:
                reason = f"duplicate: row {row} of {path.name} repeats {first[absolute]}"
                ignored.append({"path": absolute, "reason": reason})
            else:
                first[absolute] = f"row {row}"
    else:
        entries = _walk(path) if path.is_dir() else [Path(p) for p in glob.glob(spec, recursive=True)]
        for entry in sorted(entries, key=lambda e: (e.is_symlink(), e)):  # a file before links to it
            reason = _classify(entry)
            absolute = os.path.abspath(entry)
            target = os.path.realpath(entry)
            if reason is not None:
                ignored.append({"path": absolute, "reason": reason})
            elif entry.is_dir():
                continue
            elif target in first:
                ignored.append({"path": absolute, "reason": f"duplicate: the same file as {first[target]}"})
            else:
                first[target] = absolute
    if not first:
        raise ConfigError(
            f"--input {spec!r} matched no media files; expected a directory, a glob or a .parquet "
            "manifest with a 'path' column",
            param="input",
        )
    return sorted(first), sorted(ignored, key=lambda entry: entry["path"])


def clip_ranges(frames: int, clip_frames: int) -> list[tuple[int, int]]:
    """Consecutive windows of ``clip_frames`` frames; the last one may be shorter (the model pads
    it to its frame rule and decode crops back to the clip's length), so no frame is dropped."""
    return [(s, min(s + clip_frames, frames)) for s in range(0, frames, clip_frames)]


ACTOR_FLAGS = ("workers", "cpus_per_worker", "num_gpus_per_worker", "decode_tasks")  # size Ray's actors


def actor_flags_given(args: argparse.Namespace) -> list[str]:
    """The flags that size Ray's encoder actors given on the command line, as spelled there."""
    return [f"--{name.replace('_', '-')}" for name in ACTOR_FLAGS if getattr(args, name) is not None]


def check_flags(args: argparse.Namespace) -> None:
    """The arguments that need no model: counts, and options that go together."""
    for name in (
        "batch_size",
        "shard_rows",
        "workers",
        "cpus_per_worker",
        "clip_frames",
        "stride",
        "max_frames",
        "resolution",
        "limit",
    ):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}", param=name)
    for name in ("decode_tasks", "num_gpus_per_worker"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}", param=name)
    if args.resize != "none" and args.resolution is None:
        raise ConfigError(f"--resize {args.resize} needs --resolution", param="resolution")
    actor_flags = actor_flags_given(args)
    if args.engine == "driver" and actor_flags:
        raise ConfigError(
            f"--engine driver runs no encoder actors, but {', '.join(actor_flags)} sizes them", param="engine"
        )
    if args.crop != "none" and (args.resolution is None or args.resize != "none"):
        raise ConfigError(
            f"--crop {args.crop} needs --resolution and no --resize (the crop resizes each item to cover "
            "its crop size)",
            param="crop",
        )
    if args.aspect_buckets and args.crop == "none":
        raise ConfigError("--aspect-buckets needs --crop center or --crop random", param="aspect_buckets")
    if args.resolution is not None and args.resize == "none" and args.crop == "none":
        raise ConfigError(
            "--resolution needs --resize shorter-side|fit or --crop center|random (without either, "
            "every input keeps its size)",
            param="resolution",
        )
    if args.seed is not None and not args.sample:
        raise ConfigError("--seed only applies with --sample", param="seed")


def make_plan(args: argparse.Namespace, device: str, tokenizer: Tokenizer | None = None) -> JobPlan:
    """Validate the arguments against the model (loaded here on CPU, unless the caller has it)
    before any work."""
    check_flags(args)
    tokenizer = tokenizer or load_tokenizer(args.model, device="cpu")
    spec = tokenizer.spec
    if args.tokens and spec.quantizer is None:
        raise ConfigError(
            f"--tokens needs a quantized tokenizer (a quantizer block in its config, or VQModel / FSQ VidTok); "
            f"{spec.name} is continuous",
            param="tokens",
        )
    dtype = resolved_dtype(args.dtype, device)
    if dtype not in spec.dtypes:
        raise ConfigError(
            f"--dtype must be one of {list(spec.dtypes)} for {spec.name}, got {dtype}", param="dtype"
        )
    rule = spec.frame_rule if spec.modality != "image" else FrameRule()
    clip_frames = args.clip_frames or rule.padded_frames(DEFAULT_CLIP_FRAMES)
    if not rule.is_valid(clip_frames):
        lower = rule.padded_frames(max(clip_frames - rule.temporal_compression, 1))
        raise ConfigError(
            f"--clip-frames must follow {spec.name}'s frame rule ({rule.describe()}), got {clip_frames}; "
            f"nearest valid: {lower} or {rule.padded_frames(clip_frames)}",
            param="clip_frames",
        )
    if args.aspect_buckets:
        crop_sizes = bucket_sizes(args.resolution, spec.multiple)
    else:
        crop_sizes = ((args.resolution, args.resolution),) if args.crop != "none" else ()
    return JobPlan(
        model=args.model,
        model_name=spec.name,
        weights_hash=tokenizer.weights_hash,
        modality=spec.modality,
        frame_rule=rule,
        # the job's flags are named like the options; a crop's resolution is its crop size
        options=EncodeOptions.from_flags(
            {**vars(args), "resolution": None if args.crop != "none" else args.resolution}
        ),
        clip_frames=clip_frames,
        device=device,
        dtype=dtype,
        limits=Limits().with_settings(args.set_limit),
        crop=args.crop,
        crop_sizes=crop_sizes,
        tokens=spec.describe_tokens() if args.tokens else None,
    )
