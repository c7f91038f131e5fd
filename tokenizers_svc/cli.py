"""The ``tokenizers-svc`` command: list models, inspect latent files, encode media, decode latents.

Every command walks the shared runner (:mod:`tokenizers_svc.pipeline`), so the CLI behaves exactly
like the HTTP server and the batch job. Exit codes are every entry point's (``tokenizers_svc.errors``):
errors print ``error: <type>: <message>`` to stderr and exit 1; bad usage exits 2. ``serve``,
``batch-encode``, ``eval`` and ``train`` hand their arguments to the owning module's ``main(argv)``,
found by name: the library imports no application, so the dependencies keep pointing one way.

Heavy imports (torch models, diffusers) happen inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from tokenizers_svc.errors import EXIT_ERROR, EXIT_USAGE, InvalidRequestError, TokenizerError, print_error
from tokenizers_svc.options import RESIZE_POLICIES, typer_option

if TYPE_CHECKING:
    from tokenizers_svc.api import Tokenizer
    from tokenizers_svc.registry import Preset

app = typer.Typer(
    name="tokenizers-svc",
    help="Encode images and videos to latents and back with image/video tokenizers (VAEs, ViTok).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

LATENT_SUFFIX = ".safetensors"
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


Resize = Enum("Resize", {policy: policy for policy in RESIZE_POLICIES}, type=str)


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def _encode_option(name: str):
    """The typer option of an encode option (``tokenizers_svc.options``: one definition of its
    flags, default and help for the CLI, the HTTP query and the batch job)."""
    default, flags, help_text = typer_option(name)
    return typer.Option(Resize(default) if name == "resize" else default, *flags, help=help_text)


def _fail(exc: TokenizerError) -> typer.Exit:
    return typer.Exit(print_error(exc))


def _load(model: str, device: str, dtype: DType) -> Tokenizer:
    # torch and the model take seconds on a CPU: say what is happening before either
    typer.echo(f"loading {model} ({device}, {dtype.value})", err=True)
    import torch

    from tokenizers_svc.loading import load_tokenizer

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise InvalidRequestError(
            f"--device must be a torch device such as cpu or cuda:0, got {device!r}"
        ) from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError(f"--device {device} requested but CUDA is not available; use --device cpu")
    return load_tokenizer(model, device=device, dtype=getattr(torch, dtype.value))


# ---------------------------------------------------------------------------------------------- models


def _preset_row(preset: Preset, *, stats: bool = False) -> dict:
    """What a preset is, from its config (local weights' config.json, else the preset's own): no
    model class is imported, nothing is built or read beyond the config.

    ``stats`` adds parameters and GFLOPs, counted on a module built on the meta device (no weights
    allocated): 10^9 multiply-accumulates for encode + decode of one 256x256 image or one 17-frame
    256x256 clip padded to the frame rule (see :mod:`tokenizers_svc.model_stats`).
    """
    from tokenizers_svc.registry import backend_for, local_weights_dir, preset_config

    weights = local_weights_dir(preset)
    row: dict = {
        "name": preset.name,
        "description": preset.description,
        "weights": "yes" if weights is not None else ("random-init" if preset.random_init else "no"),
    }
    config = preset_config(preset)
    if not config:
        return row
    try:
        backend = backend_for(preset.class_name)
        spec = backend.described_spec(config, preset.name, weights)
    except (KeyError, TypeError, ValueError) as exc:  # e.g. a hand-made config.json in the weights home
        row["error"] = f"config does not describe the model: {type(exc).__name__}: {exc}"
        return row
    row.update(
        {
            "family": spec.family,
            "modality": spec.modality,
            "spatial_compression": spec.spatial_compression,
            "temporal_compression": spec.temporal_compression,
            "latent_channels": spec.latent_channels,
            "frame_rule": spec.frame_rule.describe(),
            "compression_ratio": round(spec.compression_ratio(256, 256, 17), 2),
            "normalization": spec.normalization.constants(),
            "normalization_summary": spec.normalization.describe(),
            # discrete models: what an autoregressive trainer needs (vocabulary, levels, id dtype, order)
            "tokens": spec.to_dict()["tokens"] if spec.quantizer is not None else None,
            "vocabulary": spec.quantizer.vocabulary_size if spec.quantizer is not None else None,
        }
    )
    if stats:
        row.update(_preset_stats(preset, config))
    return row


def _preset_stats(preset: Preset, config: dict) -> dict:
    """Parameters and GFLOPs of a preset built on the meta device; an error note when the forward
    pass has no meta kernel (the row keeps its spec)."""
    from tokenizers_svc.model_stats import backend_stats, meta_backend

    failures = (TypeError, ValueError, RuntimeError, NotImplementedError, TokenizerError)
    try:
        backend = meta_backend(preset, config)  # from_config drops keys the class does not know
        counted = backend_stats(preset.name, backend)
    except failures as exc:
        return {"error": f"GFLOPs not counted: {type(exc).__name__}: {exc}"}
    return {
        "params": counted.params,
        "gflops": round(counted.gflops, 2),
        "gflops_input": list(counted.input_shape),
    }


def _human(count: int | None) -> str:
    if count is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


@app.command()
def models(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
    stats: bool = typer.Option(
        False,
        "--stats",
        help="Also count parameters and GFLOPs (builds each model on the meta device; slower).",
    ),
) -> None:
    """List registered tokenizers from their configs: family, modality, compression, channels,
    frame rule, latent normalization, weights.

    RATIO is pixel floats per latent float at 256x256 (17 frames for video). NORMALIZATION is what
    diffusion-ready latents are: ``(raw - shift - mean[c]) / std[c] * scale``; diffusers'
    ``scaling_factor``/``shift_factor`` are scale/shift (--json has every constant). Presets whose
    weights are neither local nor defined by a config show '-'. IDS is a discrete model's vocabulary
    (--json: its whole token description). Nothing is downloaded. --stats adds
    PARAMS and GFLOPS: 10^9 multiply-accumulates for encode + decode of that input.
    """
    from tokenizers_svc.registry import list_presets

    rows = [_preset_row(p, stats=stats) for p in list_presets()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    columns = [
        ("NAME", "name"),
        ("FAMILY", "family"),
        ("MODALITY", "modality"),
        ("SPATIAL", "spatial_compression"),
        ("TEMPORAL", "temporal_compression"),
        ("CHANNELS", "latent_channels"),
        ("FRAMES", "frame_rule"),
        ("RATIO", "compression_ratio"),
        ("NORMALIZATION", "normalization_summary"),
        ("IDS", "vocabulary"),
        *([("PARAMS", "params"), ("GFLOPS", "gflops")] if stats else []),
        ("WEIGHTS", "weights"),
    ]
    table = [[title for title, _ in columns]]
    for row in rows:
        cells = []
        for _, key in columns:
            value = row.get(key)
            cells.append(_human(value) if key == "params" else ("-" if value is None else str(value)))
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    for line in table:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


# ---------------------------------------------------------------------------------------------- info


@app.command()
def info(
    file: Path = typer.Argument(..., help="A latent or token file written by `encode` or the server."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Also check the file against this tokenizer (loads it)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Validate a latent file or a token file and print its metadata: for latents the normalization
    constants (``scaling_factor``, ``shift_factor``, per-channel mean/std) of the tokenizer that
    wrote them, for token ids their vocabulary and levels."""
    from tokenizers_svc.latents import validate_for
    from tokenizers_svc.tokens import TokenIds, encoded_from_bytes, validate_tokens_for

    try:
        latents = encoded_from_bytes(_read(file))
        if model is not None:
            tokenizer = _load(model, "cpu", DType.float32)
            check = validate_tokens_for if isinstance(latents, TokenIds) else validate_for
            check(latents, tokenizer.spec, weights_hash=tokenizer.weights_hash)
    except TokenizerError as exc:
        raise _fail(exc) from None
    if isinstance(latents, TokenIds):
        _print_summary(_token_summary(file, latents, model), as_json)
        return
    meta = latents.metadata()
    summary = {
        "file": str(file),
        "tokenizer": latents.tokenizer,
        "weights_hash": latents.weights_hash,
        "layout": latents.layout,
        "shape": list(latents.latents.shape),
        "dtype": meta["dtype"],
        "normalized": latents.normalized,
        "normalization": latents.normalization.to_dict(),
        # diffusers' names: what to pass as remote_encode/remote_decode's scaling_factor/shift_factor
        "scaling_constants": latents.normalization.constants(),
        "original_size": list(latents.original_size),
        "original_frames": latents.original_frames,
        "padding": list(latents.padding),
        "fps": latents.fps,
        "source_sha256": latents.source_sha256,
        "resized_from": None if latents.resized_from is None else list(latents.resized_from),
        "sampled": latents.sampled,
        "has_posterior": latents.mean is not None,
        "format_version": int(meta["format_version"]),
        "valid_for": model,
    }
    if not as_json:
        summary["normalization"] = latents.normalization.describe()
    _print_summary(summary, as_json)


def _token_summary(file: Path, tokens, model: str | None) -> dict:
    meta = tokens.metadata()
    return {
        "file": str(file),
        "tokenizer": tokens.tokenizer,
        "weights_hash": tokens.weights_hash,
        "layout": tokens.layout,
        "shape": list(tokens.ids.shape),
        "dtype": meta["dtype"],
        "vocabulary_size": tokens.vocabulary_size,
        "levels": list(tokens.levels),
        "id_base": 0,
        "original_size": list(tokens.original_size),
        "original_frames": tokens.original_frames,
        "padding": list(tokens.padding),
        "fps": tokens.fps,
        "source_sha256": tokens.source_sha256,
        "resized_from": None if tokens.resized_from is None else list(tokens.resized_from),
        "format_version": int(meta["format_version"]),
        "valid_for": model,
    }


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        typer.echo(f"{key:17} {'-' if value is None else value}")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidRequestError(f"cannot read {str(path)!r}: {exc.strerror}", param="file") from None


OVERWRITE_HELP = "Replace output files that exist (default: refuse them, before any work)."


def _refuse_existing(paths: list[Path], overwrite: bool) -> None:
    """Outputs are never replaced unless asked: an existing path (a symlink too, dangling or not)
    is an error naming it, unless ``overwrite``."""
    existing = [path for path in paths if os.path.lexists(path)]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise InvalidRequestError(
            f"output {str(existing[0])!r}{more} exists; pass --overwrite to replace it", param="out"
        )


def _write(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write ``data`` into a new temporary file in ``path``'s folder, then rename it onto ``path``:
    an interrupted write leaves no half file, and a symlink at ``path`` is replaced, never written
    through. An existing ``path`` is refused unless ``overwrite``."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _refuse_existing([path], overwrite)
        # O_EXCL: never opens an existing file or follows a symlink planted at the temporary name
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as handle:
            handle.write(data)
        _refuse_existing([path], overwrite)  # it may have appeared while the data was written
        os.replace(temporary, path)
    except OSError as exc:
        raise InvalidRequestError(
            f"cannot write {str(path)!r}: {exc.strerror or type(exc).__name__}", param="out"
        ) from None
    finally:
        temporary.unlink(missing_ok=True)


def _make_directory(path: Path) -> None:
    """Create an output directory, or fail the way every error does (one line, exit 1)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidRequestError(
            f"cannot create output directory {str(path)!r}: {exc.strerror or type(exc).__name__}", param="out"
        ) from None


def _limits(settings: list[str] | None):
    """The server's default limits (``tokenizers_svc.limits``) with the command's --set-limit applied."""
    from tokenizers_svc.limits import Limits

    return Limits().with_settings(settings or [])


SET_LIMIT_HELP = (
    "NAME=VALUE: raise (or lower) a cap, names and defaults as the server's limits (max_pixels, "
    "max_frames, max_duration_s, max_total_pixels, max_latent_elements); repeatable."
)


# ---------------------------------------------------------------------------------------------- encode


class _ChunkProgress:
    """Progress over one video's temporal chunks (``on_chunk``), shown once a clip has several."""

    def __init__(self, desc: str, nested: bool = False) -> None:
        self.desc, self.nested = desc, nested
        self.progress = None

    def __call__(self, done: int, total: int) -> None:
        from tokenizers_svc.progress import Progress

        if total < 2:
            return
        if self.progress is None:
            self.progress = Progress(self.desc, total, "chunk", nested=self.nested)
        self.progress.update(done - self.progress.done)

    def __enter__(self) -> _ChunkProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.close()


def _expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given; a directory contributes its media files (by suffix, sorted, not recursive)."""
    from tokenizers_svc.formats import is_media_file

    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.is_file() and is_media_file(p)))
        else:
            files.append(path)
    return files


def _output_paths(files: list[Path], out: Path, as_directory: bool) -> list[Path]:
    if not as_directory:
        return [out]
    targets = [out / f"{f.stem}{LATENT_SUFFIX}" for f in files]
    seen: dict[Path, Path] = {}
    for source, target in zip(files, targets, strict=True):
        if target in seen:
            raise InvalidRequestError(
                f"inputs {str(seen[target])!r} and {str(source)!r} would both be written to {str(target)!r}; "
                "encode them in separate runs",
                param="inputs",
            )
        seen[target] = source
    return targets


@app.command()
def encode(
    inputs: list[Path] = typer.Argument(
        ..., help="Images/videos (PNG, JPEG, WebP, MP4, AVI, ...) or directories."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output file for one input; a directory for several (<stem>.safetensors)."
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Preset name or model directory; default: the shipped image tokenizer, or the video one "
        "when an input is a video.",
    ),
    raw: bool = _encode_option("normalize"),
    tokens: bool = _encode_option("tokens"),
    sample: bool = _encode_option("sample"),
    seed: int | None = _encode_option("seed"),
    posterior: bool = _encode_option("return_posterior"),
    resize: Resize = _encode_option("resize"),
    resolution: int | None = _encode_option("resolution"),
    no_tiling: bool = _encode_option("tiling"),
    tile_size: int | None = _encode_option("tile_size"),
    tile_overlap: int | None = _encode_option("tile_overlap"),
    chunk_frames: int | None = _encode_option("chunk_frames"),
    max_frames: int | None = _encode_option("max_frames"),
    start: float | None = _encode_option("start"),
    end: float | None = _encode_option("end"),
    stride: int = _encode_option("stride"),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu, cuda, cuda:1."),
    dtype: DType = typer.Option(DType.float32, "--dtype", help="Model compute dtype."),
    set_limit: list[str] | None = typer.Option(None, "--set-limit", help=SET_LIMIT_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Encode images/videos to latent files, under the server's limits. Failures are reported per
    file; the exit code is 1 if any failed.

    Progress (stderr): per file when there are several, per temporal chunk for long videos; a bar
    on a terminal, a line every 10 s otherwise.
    """
    from tokenizers_svc.defaults import default_model_for
    from tokenizers_svc.memory import tune_for_model_calls
    from tokenizers_svc.pipeline import EncodeOptions, encode_media, load_media
    from tokenizers_svc.progress import Progress

    # this command owns its process and makes model calls, one per file or tile: glibc keeps the
    # activations for the next call, and photos over ~4 MP reach torch without numpy's copies
    tune_for_model_calls()

    files = _expand_inputs(inputs)
    if not files:
        typer.echo("error: no input files (directories contribute only media files)", err=True)
        raise typer.Exit(EXIT_USAGE)
    as_directory = len(files) > 1 or out.is_dir() or any(path.is_dir() for path in inputs)
    try:
        targets = _output_paths(files, out, as_directory)
        _refuse_existing(targets, overwrite)
        options = EncodeOptions.from_flags(
            {
                "normalize": not raw,
                "sample": sample,
                "return_posterior": posterior,
                "tiling": False if no_tiling else None,
                "resize": resize.value,
                "resolution": resolution,
                "tile_size": tile_size,
                "tile_overlap": tile_overlap,
                "chunk_frames": chunk_frames,
                "max_frames": max_frames,
                "start": start,
                "end": end,
                "stride": stride,
                "seed": seed,
                "tokens": tokens,
            }
        )
        limits = _limits(set_limit)
        tokenizer = _load(model or default_model_for(files, tokens), device, dtype)
        _make_directory(out if as_directory else out.parent)
    except TokenizerError as exc:
        raise _fail(exc) from None
    failures = 0
    with Progress("encode", len(files), "file", quiet=len(files) == 1) as progress:
        for source, target in zip(files, targets, strict=True):
            with _ChunkProgress(f"encode {source.name}", nested=len(files) > 1) as chunks:
                try:
                    encoded = encode_media(
                        tokenizer, load_media(_read(source), limits, options), options, chunks
                    )
                    _write(target, encoded.to_bytes(), overwrite=overwrite)
                except TokenizerError as exc:
                    failures += 1
                    progress.write(f"error: {source}: {exc.type}: {exc.message}")
                else:
                    if len(files) == 1:
                        shape = encoded.ids.shape if tokens else encoded.latents.shape
                        typer.echo(f"{source} -> {target} {list(shape)}")
            progress.update()
    if failures:
        if len(files) > 1:  # one input: its own error line says it all
            typer.echo(f"error: {failures} of {len(files)} inputs failed", err=True)
        raise typer.Exit(EXIT_ERROR)
    if len(files) > 1:
        typer.echo(f"encoded {len(files)} inputs into {out}")


# ---------------------------------------------------------------------------------------------- decode


@app.command()
def decode(
    latents_file: Path = typer.Argument(..., metavar="LATENTS", help="A latent file or a token file."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="OUT.png / .jpg / .webp for images, OUT.mp4 for videos."
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Preset name or model directory; default: the tokenizer named in the file.",
    ),
    fps: float | None = typer.Option(
        None, "--fps", help="MP4 frame rate; default: the fps recorded at encode."
    ),
    quality: int = typer.Option(95, "--quality", help="JPEG/WebP quality 1-100."),
    no_tiling: bool = typer.Option(False, "--no-tiling", help="Decode in one pass (more memory)."),
    device: str = typer.Option("cpu", "--device", help="torch device."),
    dtype: DType = typer.Option(DType.float32, "--dtype", help="Model compute dtype."),
    set_limit: list[str] | None = typer.Option(None, "--set-limit", help=SET_LIMIT_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Decode a latent file or a token file back to an image or video, cropped to the original
    size, under the server's limits. The output is written whole or not at all, and never replaces a file unless
    --overwrite is given."""
    from tokenizers_svc.formats import check_fps, output_media_type
    from tokenizers_svc.pipeline import decode_to_media
    from tokenizers_svc.tiling import tiling_options
    from tokenizers_svc.tokens import encoded_from_bytes

    try:
        if fps is not None:
            check_fps(fps, param="--fps")
        output_media_type(out.suffix or "(no suffix)")
        _refuse_existing([out], overwrite)
        latents = encoded_from_bytes(_read(latents_file))
        tokenizer = _load(model or latents.tokenizer, device, dtype)
        with _ChunkProgress(f"decode {latents_file.name}") as chunks:
            data, media_type = decode_to_media(
                tokenizer,
                latents,
                out.suffix.lstrip("."),
                fps=fps,
                tiling=tiling_options(enabled=False if no_tiling else None),
                quality=quality,
                limits=_limits(set_limit),
                on_chunk=chunks,
            )
        _make_directory(out.parent)
        _write(out, data, overwrite=overwrite)
    except TokenizerError as exc:
        raise _fail(exc) from None
    typer.echo(f"{latents_file} -> {out} ({media_type}, {len(data)} bytes)")


# ---------------------------------------------------------------------------------------------- pass-through


def _delegate(module_name: str, argv: list[str]) -> None:
    """Run ``module_name.main(argv)``; exit 2 with a clear message when that part is not installed."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise  # a dependency of the module is missing: show the real error
        typer.echo(f"error: {module_name} is not available in this installation ({exc})", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    main = getattr(module, "main", None)
    if main is None:
        typer.echo(f"error: {module_name} has no main(argv) entry point", err=True)
        raise typer.Exit(EXIT_USAGE)
    raise typer.Exit(int(main(list(argv)) or 0))


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
def serve(ctx: typer.Context) -> None:
    """Run the HTTP service (Ray Serve); arguments go to serving.app (try `serve --help`)."""
    if not {"-h", "--help"} & set(ctx.args):  # importing Ray Serve, FastAPI and torch takes seconds
        typer.echo("tokenizers-svc serve: loading the service code", err=True)
    _delegate("serving.app", ctx.args)


@app.command("batch-encode", context_settings=PASSTHROUGH, add_help_option=False)
def batch_encode(ctx: typer.Context) -> None:
    """Encode a dataset with Ray Data; arguments go to serving.batch."""
    if not {"-h", "--help"} & set(ctx.args):  # importing Ray Data and torch, then the checks, take seconds
        typer.echo("batch-encode: checking inputs, output and model", err=True)
    _delegate("serving.batch", ctx.args)


@app.command("eval", context_settings=PASSTHROUGH, add_help_option=False)
def eval_(ctx: typer.Context) -> None:
    """Reconstruction metrics (PSNR/SSIM/FID/...); arguments go to evals.reconstruct."""
    _delegate("evals.reconstruct", ctx.args)


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
def train(ctx: typer.Context) -> None:
    """Train a tokenizer from a recipe with Accelerate; arguments go to training.train."""
    _delegate("training.train", ctx.args)


if __name__ == "__main__":  # python -m tokenizers_svc.cli: the same as the tokenizers-svc script
    app()
