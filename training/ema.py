"""Exponential moving average of the weights: what a run exports.

The averaging is diffusers' ``EMAModel`` (its decay schedule: ``(1 + n) / (10 + n)`` capped at
``decay`` with warm-up, a constant ``decay`` without). What is ours is the frozen module copy that
validation and export read: ``EMAModel`` keeps bare tensors, so its shadow tensors are made the
copy's own parameters (one copy of the weights, as before) and the copy's buffers follow the live
module's.
"""

from __future__ import annotations

import copy

import torch
from diffusers.training_utils import EMAModel
from torch import nn


class Ema:
    """EMA of a module's weights, readable as a module (:attr:`shadow`); what gets exported."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool) -> None:
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        # update_after_step=-1: the n-th update uses (1 + n) / (10 + n), the first one 2 / 11;
        # min_decay=decay without warm-up pins the decay to a constant
        self.average = EMAModel(
            self.shadow.parameters(),
            decay=float(decay),
            min_decay=0.0 if warmup else float(decay),
            update_after_step=-1,
        )
        self._share()

    def _share(self) -> None:
        """Average in place in the module copy: its parameters become EMAModel's shadow tensors."""
        self.average.copy_to(self.shadow.parameters())
        self.average.shadow_params = [p.data for p in self.shadow.parameters()]

    @property
    def updates(self) -> int:
        return self.average.optimization_step

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.average.step(module.parameters())
        for shadow, buffer in zip(self.shadow.buffers(), module.buffers(), strict=True):
            shadow.copy_(buffer)

    def state_dict(self) -> dict:
        return {"average": self.average.state_dict(), "buffers": list(self.shadow.buffers())}

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state["average"])
        self._share()
        for shadow, buffer in zip(self.shadow.buffers(), state["buffers"], strict=True):
            shadow.copy_(buffer)
