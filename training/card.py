"""What a run writes about itself: the card exported next to the weights, and TensorBoard's hparams.

The card (``card.json``) records the recipe, the data seen, the validation metrics before and after,
the loss curve and the hardware, so that an exported model can be traced back to its run.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

import accelerate
import torch
from torch import nn

from tokenizers_svc.spec import TokenizerSpec
from training.checkpointing import TrainState
from training.config import Recipe
from training.data import Source, data_summary


@dataclass
class RunFacts:
    """What the card needs from the trainer, beyond the recipe and its counters."""

    spec: TokenizerSpec
    exported: nn.Module
    ema: bool  # the exported weights are the EMA's
    sources: list[Source]
    validation_images: int
    processes: int
    device: str
    resumed_from: Path | None


def training_card(recipe: Recipe, state: TrainState, run: RunFacts) -> dict:
    """The card.json of an exported model."""
    return {
        "name": recipe.model.name or recipe.name,
        "preset": recipe.model.preset,
        "family": run.spec.family,
        "spec": run.spec.to_dict(),
        "parameters": sum(p.numel() for p in run.exported.parameters()),
        "weights": "ema" if run.ema else "raw",
        "recipe": recipe.model_dump(mode="json"),
        "data": {
            "sources": data_summary(run.sources),
            "validation": {
                "path": recipe.validation.path,
                "images": run.validation_images,
            },
            "skipped_files": state.skipped,
            "skipped_total": sum(state.skipped.values()),
        },
        "steps": state.step,
        "samples_seen": state.samples,
        "metrics": {"initial": state.initial_metrics, "final": state.metrics},
        "train_loss": [list(item) for item in state.loss_history],
        "train_terms_last": state.last_terms,
        "training": {
            "wall_s": round(state.wall_s, 1),
            "processes": run.processes,
            "device": run.device,
            "mixed_precision": recipe.mixed_precision,
            "hardware": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "accelerate": accelerate.__version__,
            "resumed_from": str(run.resumed_from) if run.resumed_from else None,
        },
    }


def flat_config(recipe: Recipe) -> dict:
    """TensorBoard hparams accept scalars only: the recipe flattened to dotted keys."""
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix] = value
        else:
            flat[prefix] = json.dumps(value)

    walk("", recipe.model_dump(mode="json"))
    return flat
