"""Training throughput (samples/s): the CPU image recipe against the issue-time settings, and the
tiny presets through the real trainer against the bare model.

CPU recipe (issue 11): ``training/recipes/cpu-image-f8c4.yaml`` (the default image model of the
issue's time, its crop size 128 and batch 4) trained through the real loop (loader, trainer step,
EMA) with the settings of that time (fp32, one torch thread, commit b1b3c54) and with the recipe's
own (bfloat16 autocast, a thread per core), plus each change alone; the cases alternate in rounds so
that each sees the same background load. ``--compile`` adds torch.compile of the bare model step.

For each preset the trainer (:class:`training.train.Trainer`) runs its own training step on real
photo / clip crops from ``../shared/data`` (data loading, loss terms, clipping, AdamW, EMA). The
baseline, measured in the same run on the same batches, is the bare model: encode -> sample ->
decode, L1 + KL, backward, AdamW step. ``trainer / bare`` is the cost of the trainer's machinery.
With ``--paper`` (meant for a GPU) the paper-size presets are measured too.

    .venv/bin/python benchmarks/train_bench.py [--steps 8] [--threads 1] [--paper] [--rounds 2]
        [--compile] [--skip-presets]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tokenizers_svc.pixels import to_float_pixels
from training.config import load_recipe, parse_recipe
from training.data import BatchPlan, make_loader
from training.model import build_backend
from training.train import Trainer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
REAL_CLIPS = ["vtest.avi", "tree.avi", "bikes.mp4", "carphone_pristine.mp4"]

# preset, crop size, frames (1 = images), per-process batch
TINY = [
    ("sd-vae-tiny", 64, 1, 4),
    ("dc-ae-f32c32-tiny", 64, 1, 4),
    ("vitok-tiny-8", 64, 1, 4),
    ("vitok-tiny-2x8", 64, 8, 2),
    ("video-vae-tiny", 64, 9, 2),
]
PAPER = [
    ("sd-vae-ft-mse", 256, 1, 8),
    ("dc-ae-f32c32", 256, 1, 8),
    ("vitok-s-b-16", 256, 1, 8),
    ("video-vae-f32t8c128", 256, 17, 1),
]
# The AutoencoderKL f8c4 first tried as the default image tokenizer, read from its recipe.
DEFAULT_IMAGE_KL = load_recipe(REPO / "training" / "recipes" / "default-image-kl.yaml").model.config


def recipe_for(preset: str, size: int, frames: int, batch: int, out: str, config: dict | None = None):
    source = (
        {"kind": "videos", "path": str(DATA / "videos"), "include": REAL_CLIPS, "frames": frames}
        if frames > 1
        else {"kind": "images", "path": str(DATA / "images" / "train")}
    )
    return parse_recipe(
        {
            "name": f"bench-{preset}",
            "output_dir": out,
            "model": {"preset": preset, "config": config or {}},
            "data": {"sources": [source], "batch_size": batch, "crop_sizes": [size]},
            "phases": [{"name": "bench", "steps": 1000}],
            "optim": {"warmup_steps": 0},
            "logging": {"tensorboard": False},
        }
    )


def measure(recipe, steps: int) -> tuple[float, float, int]:
    """(trainer samples/s, bare-model samples/s, parameters) over the same ``steps`` batches."""
    trainer = Trainer(recipe)
    device = trainer.accelerator.device
    loader = iter(make_loader(recipe, trainer.sources, trainer.spec, BatchPlan(seed=0)))
    batches = [next(loader)["pixels"] for _ in range(steps + 1)]  # decoded up front for both sides

    def trainer_step(pixels: torch.Tensor) -> None:
        trainer.micro_step(pixels.to(device).float() / 127.5 - 1.0, True, 1)
        trainer.optimizer_step()

    model = trainer.backend.module
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def bare_step(pixels: torch.Tensor) -> None:
        x = pixels.to(device).float() / 127.5 - 1.0
        mean, logvar = trainer.backend.encode_moments(x)
        z = mean if logvar is None else mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        loss = (trainer.backend.decode_latents(z) - x).abs().mean()
        if logvar is not None:
            loss = loss + 1e-6 * (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).sum() / x.shape[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    trainer_step(batches[0])  # warm-up (allocator, kernels)
    bare_step(batches[0])
    elapsed = [0.0, 0.0]
    for pixels in batches[1:]:  # interleaved, so both sides see the same background load
        for index, step in enumerate((trainer_step, bare_step)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(pixels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed[index] += time.perf_counter() - start
    samples = sum(b.shape[0] for b in batches[1:])
    rates = [samples / seconds for seconds in elapsed]
    trainer.accelerator.end_training()
    return rates[0], rates[1], sum(p.numel() for p in model.parameters())


CPU_RECIPE = REPO / "training" / "recipes" / "cpu-image-f8c4.yaml"
# The issue-time recipe's speed settings: `accelerate launch --num_cpu_threads_per_process 1`, fp32,
# L1; crop size and batch are pinned to the same values for every case.
ISSUE_TIME = ["mixed_precision='no'", "cpu_threads=1", "loss.reconstruction=l1"]
CPU_CASES = [
    ("issue-time settings (fp32, 1 thread)", ISSUE_TIME),
    ("+ a thread per core", [*ISSUE_TIME, "cpu_threads=2"]),
    ("+ bfloat16 autocast", [*ISSUE_TIME, "mixed_precision=bf16"]),
    ("recipe (bf16, 2 threads, MSE)", []),
    ("recipe + 1 loader worker", ["data.num_workers=1"]),
]


def loop_rate(overrides: list[str], steps: int, out: str) -> float:
    """Samples/s of the real training loop (next batch from the loader, trainer micro step, optimizer
    step with clipping and EMA) over ``steps`` steps after two warm-up steps."""
    recipe = load_recipe(
        CPU_RECIPE,
        [
            f"data.sources.0.path={DATA / 'images' / 'train'}",
            "data.crop_sizes=[128]",
            "validation.path=null",
            f"output_dir={out}",
            *overrides,
        ],
    )
    trainer = Trainer(recipe)
    loader = iter(make_loader(recipe, trainer.sources, trainer.spec, BatchPlan(seed=0)))
    samples, start = 0, 0.0
    for step in range(steps + 2):
        if step == 2:
            start = time.perf_counter()
        pixels = next(loader)["pixels"]
        trainer.micro_step(to_float_pixels(pixels), True, 1)
        trainer.optimizer_step()
        samples += pixels.shape[0] * (step >= 2)
    rate = samples / (time.perf_counter() - start)
    trainer.accelerator.end_training()
    return rate


def cpu_recipe_table(steps: int, rounds: int) -> None:
    """Each case in its own process (Accelerate's state, torch's thread count and the allocator start
    fresh), alternating in rounds."""
    print(f"CPU recipe {CPU_RECIPE.name}: crop 128, batch 4, {steps} timed steps x {rounds} rounds per case")
    rates: dict[str, list[float]] = {name: [] for name, _ in CPU_CASES}
    for _ in range(rounds):
        for index, (name, _) in enumerate(CPU_CASES):
            command = [sys.executable, __file__, "--loop-case", str(index), "--steps", str(steps)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rates[name].append(float(out.strip().splitlines()[-1]))
    base = sum(rates[CPU_CASES[0][0]]) / rounds
    print("| settings | samples/s (per round) | mean | vs issue-time |")
    print("|---|---|---:|---:|")
    for name, values in rates.items():
        mean = sum(values) / rounds
        per_round = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {per_round} | {mean:.2f} | {mean / base:.2f}x |", flush=True)


def compile_table(steps: int) -> None:
    """The bare step of the CPU recipe's model (bf16 autocast, a thread per core), eager and compiled."""
    recipe = load_recipe(CPU_RECIPE, ["validation.path=null"])
    torch.set_num_threads(recipe.cpu_threads or torch.get_num_threads())
    backend = build_backend(recipe)
    module = backend.module
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    x = torch.rand(4, 3, 128, 128) * 2 - 1

    def forward(x: torch.Tensor) -> torch.Tensor:
        return backend.decode_latents(backend.encode_moments(x)[0])

    print("| bare step (bf16, crop 128, batch 4) | first 2 steps s | samples/s |")
    print("|---|---:|---:|")
    for name, fn in (("eager", forward), ("torch.compile (inductor)", torch.compile(forward))):
        timings = []
        for _ in range(steps + 2):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = (fn(x).float() - x).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            timings.append(time.perf_counter() - start)
        rate = 4 * steps / sum(timings[2:])
        print(f"| {name} | {sum(timings[:2]):.1f} | {rate:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--paper", action="store_true", help="also the paper-size presets (GPU)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the CPU recipe cases")
    parser.add_argument("--compile", action="store_true", help="also torch.compile of the bare step")
    parser.add_argument("--skip-presets", action="store_true", help="only the CPU recipe tables")
    parser.add_argument("--loop-case", type=int, help=argparse.SUPPRESS)  # one CPU case, in a subprocess
    args = parser.parse_args()
    if args.loop_case is not None:
        with tempfile.TemporaryDirectory() as tmp:
            print(loop_rate(CPU_CASES[args.loop_case][1], args.steps, tmp))
        return
    if not torch.cuda.is_available():
        cpu_recipe_table(args.steps, args.rounds)
        if args.compile:
            compile_table(args.steps)
    if args.skip_presets:
        return
    torch.set_num_threads(args.threads)
    cases = [(p, s, f, b, None) for p, s, f, b in TINY]
    cases.append(("sd-vae-tiny", 128, 1, 4, DEFAULT_IMAGE_KL))
    if args.paper:
        cases += [(p, s, f, b, None) for p, s, f, b in PAPER]
    print(f"torch threads {torch.get_num_threads()}, {args.steps} timed steps per side")
    print("| preset | input | batch | params | trainer samples/s | bare samples/s | trainer / bare |")
    print("|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for preset, size, frames, batch, config in cases:
            recipe = recipe_for(preset, size, frames, batch, tmp, config)
            trainer_rate, bare_rate, params = measure(recipe, args.steps)
            name = "default-image model" if config else preset
            shape = f"{frames}x{size}x{size}" if frames > 1 else f"{size}x{size}"
            print(
                f"| {name} | {shape} | {batch} | {params / 1e6:.2f}M | {trainer_rate:.2f} | {bare_rate:.2f} "
                f"| {trainer_rate / bare_rate:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
