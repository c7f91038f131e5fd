"""Every GPU measurement the project needs, in one command that stops itself inside a time budget.

    python benchmarks/gpu_check.py --budget-s 240 --out runs/gpu-check [--default-model DIR]
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check        # CPU, toy sizes (CI runs this)

A GPU is lent for minutes at a time, so the script is prepared and tested on CPU beforehand
(``--dry-run`` runs the same code paths with tiny presets and sizes). Sections, in order of value:

1. inference: encode / decode images per second (frames per second for video) of random-init models
   with the published architectures, fp32 (diffusers' default) vs bf16 and fp16, plus channels_last
   and torch.compile for bf16, and the max abs difference of each low-precision output from fp32;
2. the default image tokenizer: PSNR of bf16 and fp16 reconstructions against fp32 ones on real
   photos (decides whether serving uses bf16 on GPU). Service and batch job on GPU are not measured
   here: Ray's wheel (79 MB) does not fit the 64 MiB a lent machine receives;
3. training: optimiser steps per second and peak memory of the paper-size architectures (bf16
   autocast, AdamW, batch as in their recipes);
4. memory: the largest square image each preset encodes + decodes untiled, doubling the side until
   it fails or passes 4096 px;
5. torch.compile of the image models at one size (last: compiling costs tens of seconds a model).

Each measurement checks the remaining budget first and is recorded as skipped when it would not fit.
Results go to ``results.json`` and ``results.md`` in ``--out`` as they are measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark

from tokenizers_svc.loading import build_module
from tokenizers_svc.pixels import to_uint8_pixels
from tokenizers_svc.registry import backend_for, get_preset

FULL = {
    "image_models": ["sd-vae-ft-mse", "dc-ae-f32c32", "flux-vae", "vitok-s-b-16"],
    "image_sizes": [256, 512, 1024],
    "video_models": ["ltx-video-vae"],
    "video_shapes": [(17, 256), (49, 512)],
    "train_models": [("dc-ae-f32c32", 16, 256), ("vitok-s-b-16", 32, 256), ("video-vae-f32t8c128", 2, 256)],
    "batch": 8,
    "repeats": 5,
    "max_side": 4096,
    "compile_size": 512,
    "variants": ["fp32", "bf16", "fp16", "bf16+channels_last"],
    "compile_variants": ["fp32", "bf16", "bf16+compile"],
    "compile_models": ["sd-vae-ft-mse", "dc-ae-f32c32", "flux-vae", "vitok-s-b-16"],
    "precisions": ["fp32", "bf16", "fp16"],
}
DRY = {
    "image_models": ["sd-vae-tiny", "dc-ae-f32c32-tiny", "vitok-tiny-8"],
    "image_sizes": [64],
    "video_models": ["video-vae-tiny"],
    "video_shapes": [(5, 64)],
    "train_models": [("dc-ae-f32c32-tiny", 2, 64), ("video-vae-tiny", 1, 64)],
    "batch": 2,
    "repeats": 1,
    "max_side": 128,
    "compile_size": 64,
    # low-precision convolutions crash this CPU's oneDNN build: the dry run keeps to fp32 layouts
    "variants": ["fp32", "fp32+channels_last"],
    "compile_variants": ["fp32", "fp32+compile"],
    # inductor's CPU code generation takes ~30 s a model here: one model keeps the path working
    "compile_models": ["dc-ae-f32c32-tiny"],
    "precisions": ["fp32"],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    @property
    def left(self) -> float:
        return self.deadline - time.monotonic()


class Results:
    """results.json / results.md rewritten after every measurement, so a killed run keeps what it had."""

    def __init__(self, out: Path, device: str) -> None:
        self.out = out
        self.data: dict = {"device": device, "torch": torch.__version__, "sections": {}}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, section: str, row: dict) -> None:
        self.data["sections"].setdefault(section, []).append(row)
        (self.out / "results.json").write_text(json.dumps(self.data, indent=2) + "\n")
        (self.out / "results.md").write_text(self.markdown())

    def markdown(self) -> str:
        lines = [f"# GPU check on {self.data['device']} (torch {self.data['torch']})", ""]
        for section, rows in self.data["sections"].items():
            keys = list(dict.fromkeys(k for row in rows for k in row))
            lines += [f"## {section}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |" for row in rows]
            lines.append("")
        return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Seconds per call (median of ``repeats`` single-call measurements of torch's benchmark Timer,
    which synchronizes CUDA around each, after one warm-up call) and the warm-up's output."""
    out = fn()
    sync(device)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    times = [timer.timeit(1).median for _ in range(repeats)]
    return sorted(times)[len(times) // 2], out


def build_backend(name: str, device: torch.device, dtype: torch.dtype):
    """A preset's architecture with random weights initialised on ``device`` (fast for 400M params),
    in ``dtype``."""
    preset = get_preset(name)
    with device:
        module = build_module(replace(preset, config=dict(preset.config)))
    module = module.to(device=device, dtype=dtype).eval()
    return backend_for(preset.class_name).from_module(module, name)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


@torch.no_grad()
def inference(config: dict, device: torch.device, budget: Budget, results: Results) -> None:
    """Encode/decode throughput per model, dtype variant and size, with low-precision error against
    fp32. Each model is built once (random init on the device) and cast variant by variant."""
    jobs = [(m, [(1, s) for s in config["image_sizes"]], "image") for m in config["image_models"]]
    jobs += [(m, config["video_shapes"], "video") for m in config["video_models"]]
    for name, shapes, kind in jobs:
        if budget.left < 20:
            results.add("inference", {"model": name, "status": "skipped: budget"})
            continue
        backend = build_backend(name, device, torch.float32)
        references: dict[tuple[int, int], tuple[torch.Tensor, float]] = {}
        for label in config["variants"]:
            dtype = DTYPES[label.split("+")[0]]
            backend.module.to(dtype=dtype)
            layout = torch.channels_last if label.endswith("channels_last") and kind == "image" else None
            backend.module.to(memory_format=layout or torch.contiguous_format)
            encode, decode = backend.encode_moments, backend.decode_latents
            if label.endswith("compile"):
                encode, decode = torch.compile(encode), torch.compile(decode)
            for frames, side in shapes:
                if label.endswith("compile") and side != config["compile_size"]:
                    continue  # one shape per model: each new shape recompiles
                row = {"model": name, "frames": frames, "size": side, "variant": label}
                if budget.left < 20:
                    results.add("inference", row | {"status": "skipped: budget"})
                    continue
                results.add(
                    "inference",
                    row
                    | measure(
                        backend, encode, decode, kind, frames, side, dtype, layout, config, device, references
                    ),
                )


def measure(backend, encode, decode, kind, frames, side, dtype, layout, config, device, references) -> dict:
    """One (variant, shape) measurement; failures are recorded, not raised."""
    batch = config["batch"] if kind == "image" else 1
    shape = (batch, 3, side, side) if kind == "image" else (1, 3, frames, side, side)
    try:
        reset_peak(device)
        generator = torch.Generator(device="cpu").manual_seed(0)
        x = (torch.rand(shape, generator=generator) * 2 - 1).to(device=device, dtype=dtype)
        if layout is not None:
            x = x.contiguous(memory_format=layout)
        enc_s, (mean, _) = timed(partial(encode, x), device, config["repeats"])
        dec_s, recon = timed(partial(decode, mean), device, config["repeats"])
        items = batch * frames
        row = {
            "batch": batch,
            "encode_items_s": items / enc_s,
            "decode_items_s": items / dec_s,
            "round_trip_items_s": items / (enc_s + dec_s),
            "peak_gb": peak_gb(device),
        }
        key = (frames, side)
        if dtype == torch.float32 and layout is None and key not in references:
            references[key] = (recon.float().cpu(), enc_s + dec_s)
        elif key in references:
            reference, fp32_seconds = references[key]
            row["speedup_vs_fp32"] = fp32_seconds / (enc_s + dec_s)
            row["max_abs_diff_vs_fp32"] = float((recon.float().cpu() - reference).abs().max())
        return row | {"status": "ok"}
    except Exception as exc:  # one failing variant must not stop the table
        return {"status": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}


@torch.no_grad()
def default_model_precision(
    config: dict, model: str, data: Path, device: torch.device, results: Results, limit: int
) -> None:
    """PSNR of bf16/fp16 reconstructions against the fp32 reconstruction (and the originals)."""
    from evals.image_metrics import psnr
    from tokenizers_svc import load_tokenizer
    from tokenizers_svc.crops import load_multiscale

    crops = load_multiscale(data, max_items=limit).pixels
    outputs = {}
    for label in config["precisions"]:
        dtype = DTYPES[label]
        tokenizer = load_tokenizer(model, device=device, dtype=dtype)
        recon = [
            to_uint8_pixels(tokenizer.decode(tokenizer.encode(b.to(device))).float()).cpu()
            for b in crops.split(8)
        ]
        outputs[label] = torch.cat(recon)
        row = {
            "model": model,
            "dtype": label,
            "n": len(crops),
            "psnr_vs_original": float(psnr(crops, outputs[label]).mean()),
        }
        if label != "fp32":
            row["psnr_vs_fp32"] = float(psnr(outputs["fp32"], outputs[label]).mean())
            row["psnr_drop_db"] = results_drop(row, results)
        results.add("default model precision", row)


def results_drop(row: dict, results: Results) -> float:
    fp32 = next(r for r in results.data["sections"]["default model precision"] if r["dtype"] == "fp32")
    return fp32["psnr_vs_original"] - row["psnr_vs_original"]


def train_step(backend, optimizer: torch.optim.Optimizer, x: torch.Tensor, autocast) -> None:
    """One L1 reconstruction step (forward, backward, AdamW update)."""
    with autocast:
        mean, _ = backend.encode_moments(x)
        loss = (backend.decode_latents(mean).float() - x).abs().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training(config: dict, device: torch.device, budget: Budget, results: Results) -> None:
    """Optimiser steps/s and peak memory of paper-size architectures (bf16 autocast on GPU)."""
    for name, batch, side in config["train_models"]:
        if budget.left < 30:
            results.add("training", {"model": name, "status": "skipped: budget"})
            continue
        row = {"model": name, "batch": batch, "crop": side}
        try:
            reset_peak(device)
            backend = build_backend(name, device, torch.float32)
            backend.module.train()
            optimizer = torch.optim.AdamW(backend.module.parameters(), lr=1e-4)
            frames = backend.spec.frame_rule.padded_frames(9) if backend.spec.modality != "image" else None
            shape = (batch, 3, side, side) if frames is None else (batch, 3, frames, side, side)
            x = torch.rand(shape, device=device) * 2 - 1
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

            seconds, _ = timed(
                partial(train_step, backend, optimizer, x, autocast), device, config["repeats"] * 2
            )
            row |= {
                "frames": frames or 1,
                "steps_s": 1 / seconds,
                "samples_s": batch / seconds,
                "peak_gb": peak_gb(device),
                "status": "ok",
            }
            del backend, optimizer, x
        except Exception as exc:
            row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        results.add("training", row)


@torch.no_grad()
def largest_side(config: dict, device: torch.device, budget: Budget, results: Results) -> None:
    """The largest square side (doubling from 512) each image model encodes and decodes untiled in bf16."""
    for name in config["image_models"]:
        side, largest = min(512, config["max_side"]), None
        backend = build_backend(name, device, DTYPES[config["variants"][1].split("+")[0]])
        while side <= config["max_side"] and budget.left > 20:
            try:
                reset_peak(device)
                x = torch.zeros(1, 3, side, side, device=device, dtype=backend.dtype)
                backend.decode_latents(backend.encode_moments(x)[0])
                sync(device)
                largest = {"side": side, "peak_gb": peak_gb(device)}
                side *= 2
            except torch.OutOfMemoryError:
                break
            finally:
                x = None
        results.add("largest untiled image (bf16)", {"model": name, **(largest or {"side": "< 512"})})
        del backend


def compile_config(config: dict) -> dict:
    """torch.compile recompiles for every new shape and costs tens of seconds per model, so it is
    measured last, for the image models at one size, next to fresh fp32 and plain low-precision runs."""
    return config | {
        "image_models": config["compile_models"],
        "variants": config["compile_variants"],
        "image_sizes": [config["compile_size"]],
        "video_models": [],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop before this many seconds")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    parser.add_argument("--default-model", default="tsvc-image-f8c4", help="model for the precision check")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/images/val"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny presets and sizes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    budget = Budget(args.budget_s)
    config = DRY if args.dry_run else FULL
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    results = Results(args.out, torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    sections = [
        lambda: default_model_precision(
            config, args.default_model, args.data, device, results, 4 if args.dry_run else 64
        ),
        lambda: inference(config, device, budget, results),
        lambda: training(config, device, budget, results),
        lambda: largest_side(config, device, budget, results),
        lambda: inference(compile_config(config), device, budget, results),
    ]
    for section in sections:
        if budget.left < 10:
            break
        try:
            section()
        except Exception:
            traceback.print_exc()
            results.add("errors", {"error": traceback.format_exc().splitlines()[-1][:200]})
    print(results.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
