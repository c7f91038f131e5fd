"""Train, evaluate and export the default tokenizers on one GPU inside a wall-clock budget.

    python -m benchmarks.gpu_defaults --budget-s 300 --out runs/gpu-defaults     # = make train-defaults-gpu
    python -m benchmarks.gpu_defaults --dry-run --out /tmp/dry                   # same code paths on CPU, toy sizes

A GPU is lent for minutes, so the runs are sized to the time they have rather than to a step count
guessed in advance: every job (the image candidates and the video default, concurrently on the one
GPU) first runs a short probe under the same contention, the measured seconds per step fix the real
run's ``phases.0.steps`` (written into the recipe the card records, so the run is reproducible as a
plain ``training.train`` call), then all real runs start together. Afterwards the image candidates are
scored with the multi-scale protocol (``evals.multiscale``) on the validation photos against bicubic at
equal floats, the video default on held-out clip segments (``evals.heldout_video``), and
``results.json`` / ``results.md`` name the winner.

An orchestration script over both applications (it starts ``training.train`` runs and scores them with
``evals``), so it lives here rather than in the trainer: applications do not import each other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import training
from evals.heldout_video import REAL_CLIPS, compare_tokenizer, tokenizer_round_trip
from evals.multiscale import compare
from tokenizers_svc import load_tokenizer
from tokenizers_svc.crops import load_multiscale, segment_clips

RECIPES = Path(training.__file__).parent / "recipes"
IMAGE_CANDIDATES = ("default-image", "gpu-image-f16c16")
VIDEO_RECIPE = "default-video"
PROBE_STEPS = 40
STARTUP_S = 25.0  # imports, photo decoding and the first validation of a real run
FINISH_S = 20.0  # final validation, checkpoint and export
SAFETY = 0.85  # share of the remaining time the step count is sized for
DRY_RUN_OVERRIDES = [
    "mixed_precision='no'",
    "data.batch_size=2",
    "data.crop_sizes=[64]",
    "data.num_workers=0",
    "validation.max_images=2",
    "validation.resolution=64",
    "validation.batch_size=2",
    "optim.warmup_steps=1",
    "model.latent_statistics=scalar",  # the per-channel fit encodes ~300 crops: minutes on a CPU
]


@dataclass
class Job:
    recipe: str
    run_dir: Path
    overrides: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    log: Path | None = None

    def start(self, steps: int, extra: list[str], logs: Path, tag: str) -> None:
        self.log = logs / f"{self.recipe}-{tag}.log"
        command = [
            sys.executable,
            "-m",
            "training.train",
            "--recipe",
            str(RECIPES / f"{self.recipe}.yaml"),
            f"output_dir={self.run_dir}",
            f"phases.0.steps={steps}",
            *self.overrides,
            *extra,
        ]
        with self.log.open("w") as handle:
            self.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)

    def wait(self, deadline: float) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return -9

    @property
    def card(self) -> dict:
        return json.loads((self.run_dir / "export" / "card.json").read_text())


def seconds_per_step(card: dict) -> float:
    """Seconds per optimiser step in the last logging window of a finished probe: warm caches, data
    workers up, kernels chosen (the whole probe's mean counted start-up and ran 2.5x slow on an H200)."""
    samples_per_step = card["samples_seen"] / max(card["steps"], 1)
    return samples_per_step / card["train_terms_last"]["samples_per_s"]


def run_jobs(jobs: list[Job], budget_s: float, logs: Path, dry_run: bool) -> dict:
    """Probe every job concurrently, size the real runs to the remaining budget, run them concurrently."""
    started = time.monotonic()
    probe_steps = 2 if dry_run else PROBE_STEPS
    probe_extra = [
        "validation.path=null",
        "checkpoint.every=1000000",
        "logging.every=10",
        "model.latent_statistics=scalar",  # a probe's export is only read for its timing
    ]
    real_dirs = {job.recipe: job.run_dir for job in jobs}
    for job in jobs:
        job.run_dir = real_dirs[job.recipe].with_name(real_dirs[job.recipe].name + "-probe")
        job.start(probe_steps, probe_extra, logs, "probe")
    rates = {}
    for job in jobs:
        code = job.wait(started + budget_s / 3)
        rates[job.recipe] = seconds_per_step(job.card) if code == 0 else None
        job.run_dir = real_dirs[job.recipe]
    remaining = budget_s - (time.monotonic() - started) - STARTUP_S - FINISH_S
    plan = {}
    for job in jobs:
        rate = rates[job.recipe]
        if rate is None:
            plan[job.recipe] = {"status": "probe failed", "log": str(job.log)}
            continue
        steps = 3 if dry_run else max(int(SAFETY * remaining / rate), 100)
        plan[job.recipe] = {"seconds_per_step_probe": rate, "steps": steps}
        job.start(steps, [], logs, "train")
    deadline = started + budget_s
    for job in jobs:
        if job.process is None or "steps" not in plan[job.recipe]:
            continue
        code = job.wait(deadline)
        plan[job.recipe]["exit_code"] = code
        if code == 0:
            card = job.card
            plan[job.recipe] |= {
                "export": str(job.run_dir / "export"),
                "wall_s": card["training"]["wall_s"],
                "val_psnr_center_crops": card["metrics"]["final"].get("val_psnr"),
            }
    return plan


def evaluate_images(plan: dict, val: Path, device: str, max_items: int | None) -> dict:
    crops = load_multiscale(val, max_items=max_items)
    scores = {}
    for recipe in IMAGE_CANDIDATES:
        export = plan.get(recipe, {}).get("export")
        if not export:
            continue
        tokenizer = load_tokenizer(export, device=device)
        floats = tokenizer.spec.latent_floats((1, 3, 256, 256))
        scores[recipe] = compare(crops, tokenizer_round_trip(tokenizer), floats)
    return scores


def evaluate_video(plan: dict, videos: Path, device: str, dry_run: bool) -> dict | None:
    export = plan.get(VIDEO_RECIPE, {}).get("export")
    if not export:
        return None
    clips, names = segment_clips(
        [videos / name for name in REAL_CLIPS],
        clips_per_video=1 if dry_run else 4,
        frames=5 if dry_run else 17,
        resolution=64 if dry_run else 256,
    )
    return compare_tokenizer(clips, names, load_tokenizer(export, device=device))


def markdown(results: dict) -> str:
    lines = [f"# GPU defaults run ({results['device']}, budget {results['budget_s']} s)", ""]
    lines += ["| job | steps | s/step (probe) | wall s | exit |", "|---|---|---|---|---|"]
    for recipe, item in results["plan"].items():
        lines.append(
            f"| {recipe} | {item.get('steps', '-')} | {item.get('seconds_per_step_probe', float('nan')):.4f} "
            f"| {item.get('wall_s', '-')} | {item.get('exit_code', item.get('status', '-'))} |"
        )
    lines += ["", "## Images: multi-scale val crops, PSNR dB (95% CI) vs bicubic at equal floats", ""]
    lines += ["| candidate | n | PSNR | bicubic | gain | per scale gain |", "|---|---|---|---|---|---|"]
    for recipe, s in results["images"].items():
        per_scale = ", ".join(f"{k}: {v['gain_db']:+.2f}" for k, v in s["per_scale"].items())
        lines.append(
            f"| {recipe} | {s['n']} | {s['psnr']:.2f} ± {s['psnr_ci95']:.2f} | {s['bicubic_psnr']:.2f} "
            f"| {s['gain_db']:+.2f} ± {s['gain_ci95']:.2f} | {per_scale} |"
        )
    if results.get("winner"):
        lines += ["", f"Winner: **{results['winner']}**"]
    video = results.get("video")
    if video:
        lines += [
            "",
            "## Video: held-out clip segments (last 20%), PSNR dB",
            "",
            f"model {video['model']['psnr']:.2f} ± {video['model']['psnr_ci95']:.2f}, "
            f"bicubic spatial {video['bicubic_spatial']['psnr']:.2f}, spatio-temporal "
            f"{video['bicubic_spatiotemporal']['psnr']:.2f}; gain over {video['best_baseline']} "
            f"{video['gain_db']:+.2f} ± {video['gain_ci95']:.2f} (n = {video['n']}); mean error RGB "
            f"{video['mean_error_rgb']}",
        ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_defaults", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--budget-s", type=float, default=300.0, help="wall-clock seconds for training")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-defaults"))
    parser.add_argument(
        "--data", type=Path, default=Path("../shared/data"), help="images/ and videos/ inside"
    )
    parser.add_argument("--jobs", default=",".join((*IMAGE_CANDIDATES, VIDEO_RECIPE)))
    parser.add_argument(
        "--set", action="append", default=[], help="recipe override for every job (key=value), repeatable"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, toy sizes, a few steps: checks the code paths"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    data_overrides = [
        f"data.sources.0.path={args.data / 'images' / 'train'}",
        f"validation.path={args.data / 'images' / 'val'}",
    ]
    jobs = []
    for recipe in args.jobs.split(","):
        overrides = list(data_overrides)
        if recipe == VIDEO_RECIPE:
            overrides = [
                f"data.sources.0.path={args.data / 'videos'}",
                f"data.sources.1.path={args.data / 'images' / 'train'}",
                f"validation.path={args.data / 'images' / 'val'}",
            ]
            if args.dry_run:
                overrides += [
                    "data.sources.0.frames=5",
                    "data.sources.0.batch_size=1",
                    "data.sources.1.batch_size=2",
                ]
        if args.dry_run:
            overrides += DRY_RUN_OVERRIDES
        overrides += args.set
        jobs.append(Job(recipe, args.out / recipe, overrides))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    plan = run_jobs(jobs, args.budget_s, logs, args.dry_run)
    images = evaluate_images(plan, args.data / "images" / "val", device, 8 if args.dry_run else None)
    winner = max(images, key=lambda r: images[r]["gain_db"]) if images else None
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "budget_s": args.budget_s,
        "dry_run": args.dry_run,
        "plan": plan,
        "images": images,
        "winner": winner,
        "video": evaluate_video(plan, args.data / "videos", device, args.dry_run),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))
    failed = [recipe for recipe, item in plan.items() if item.get("exit_code") != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
