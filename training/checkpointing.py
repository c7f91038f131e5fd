"""Checkpoints: the counters saved beside Accelerate's state, where checkpoints live, which are kept.

A run's checkpoints are ``output_dir/checkpoints/step_XXXXXXXX`` (accelerator state: model,
optimizers, EMA, :class:`TrainState`); the newest ``checkpoint.keep`` are kept.

Why not accelerate's ``ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=...)``:
its folders are ``checkpoint_<number of saves by this process>``, not the step, and ``load_state``
does not restore that counter. Measured (accelerate as pinned, three saves with ``total_limit=2``,
then a fresh Accelerator that ``load_state()``s and saves once): the resumed run writes
``checkpoint_0`` and its pruning, which sorts by that number, deletes ``checkpoint_1`` and keeps
``checkpoint_2``, so the next resume would pick the older state. A resumed run must continue the
same sequence (``tests/test_training.py`` resumes and compares weights), so names carry the step.
"""

from __future__ import annotations

import shutil
from pathlib import Path

CHECKPOINT_PREFIX = "step_"


class TrainState:
    """Counters saved with every checkpoint (the rest of the state is Accelerate's)."""

    def __init__(self) -> None:
        self.step = 0
        self.samples = 0
        self.wall_s = 0.0
        self.skipped: dict[str, int] = {}  # file -> times it failed to decode (this process)
        self.initial_metrics: dict = {}
        self.metrics: dict = {}
        self.loss_history: list[tuple[int, float]] = []  # (step, mean total loss of the logging window)
        self.last_terms: dict[str, float] = {}  # every logged term of the last logging window

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)


# Recipe keys that change how a run is executed or recorded, not what it trains: a resumed run may
# differ in these (another output folder, more loader workers, other logging or checkpoint cadence).
OPERATIONAL_KEYS = (
    "output_dir",
    "cpu_threads",
    "data.num_workers",
    "data.cache_images",
    "logging.",
    "checkpoint.",
)
RECIPE_FILE = "recipe.json"  # the recipe a checkpoint was made with, beside Accelerate's state


def flatten(value, prefix: str = "") -> dict[str, object]:
    """A recipe as dotted keys down to the leaves, list items by index (``phases.0.steps``)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(index), item) for index, item in enumerate(value))
    else:
        return {prefix: value}
    flat: dict[str, object] = {}
    for key, item in items:
        flat |= flatten(item, f"{prefix}.{key}" if prefix else str(key))
    return flat


def recipe_differences(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every training-relevant key that differs (operational keys skipped)."""
    old, new = flatten(saved), flatten(current)
    return [
        f"{key}: {old.get(key, '(absent)')} -> {new.get(key, '(absent)')}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not key.startswith(OPERATIONAL_KEYS)
    ]
