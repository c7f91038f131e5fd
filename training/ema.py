"""Exponential moving average of the weights: what a run exports."""

from __future__ import annotations

import copy

import torch
from torch import nn


class Ema:
    """Exponential moving average of a module's weights (a frozen copy); what gets exported."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool) -> None:
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        for shadow, param in zip(self.shadow.parameters(), module.parameters(), strict=True):
            shadow.lerp_(param.detach().to(shadow.dtype), 1.0 - decay)
        for shadow, buffer in zip(self.shadow.buffers(), module.buffers(), strict=True):
            shadow.copy_(buffer)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.shadow.load_state_dict(state["shadow"])
        self.updates = int(state["updates"])
