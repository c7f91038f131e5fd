"""Training throughput (samples/s) of the tiny presets through the real trainer, vs the bare model.

For each preset the trainer (:class:`training.train.Trainer`) runs its own training step on real
photo / clip crops from ``../shared/data`` (data loading, loss terms, clipping, AdamW, EMA). The
baseline, measured in the same run on the same batches, is the bare model: encode -> sample ->
decode, L1 + KL, backward, AdamW step. ``trainer / bare`` is the cost of the trainer's machinery.
With ``--paper`` (meant for a GPU) the paper-size presets are measured too.

    .venv/bin/python benchmarks/train_bench.py [--steps 8] [--threads 1] [--paper]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from training.config import load_recipe, parse_recipe
from training.data import BatchPlan, make_loader
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--paper", action="store_true", help="also the paper-size presets (GPU)")
    args = parser.parse_args()
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
