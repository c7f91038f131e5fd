"""The learning-rate schedule: warmup then cosine, restarted at each phase of the recipe."""

from __future__ import annotations

import math

from training.config import Recipe


def lr_at(recipe: Recipe, step: int) -> float:
    """Linear warmup then cosine to ``lr * min_lr_ratio``, restarted at each phase."""
    _, phase, local = recipe.phase_at(step)
    base = phase.lr or recipe.optim.lr
    warmup = min(recipe.optim.warmup_steps, phase.steps - 1)
    if local < warmup:
        return base * (local + 1) / (warmup + 1)
    progress = (local - warmup) / max(phase.steps - warmup, 1)
    ratio = recipe.optim.min_lr_ratio
    return base * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
