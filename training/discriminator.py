"""Patch discriminator (pix2pix / taming-transformers ``NLayerDiscriminator``).

Input float pixels in [-1, 1], (N, 3, H, W) or (N, 3, T, H, W) (frames judged independently);
output one real/fake logit per overlapping patch, (N', 1, h, w). Receptive field with 3 layers: 70 px.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from training.losses import frames_2d


@dataclass(frozen=True)
class PatchDiscriminatorConfig:
    in_channels: int = 3
    channels: int = 64  # first layer width, doubled per layer up to 8x (pix2pix)
    layers: int = 3  # stride-2 layers; 3 gives the 70x70 PatchGAN
    max_multiplier: int = 8

    def to_dict(self) -> dict:
        return asdict(self)


class PatchDiscriminator(nn.Module):
    def __init__(self, config: PatchDiscriminatorConfig) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        blocks: list[nn.Module] = [nn.Conv2d(config.in_channels, c, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = c
        for i in range(1, config.layers + 1):
            out = c * min(2**i, config.max_multiplier)
            stride = 2 if i < config.layers else 1  # the last hidden layer keeps the resolution
            # GroupNorm(1) (= LayerNorm over C,H,W) instead of BatchNorm: independent of the batch
            # split across processes, so one- and two-process runs compute the same thing
            blocks += [
                nn.Conv2d(width, out, 4, stride, 1, bias=False),
                nn.GroupNorm(1, out),
                nn.LeakyReLU(0.2, True),
            ]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        self.apply(_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = frames_2d(x)  # (N', 3, H, W), N' = N*T for clips
        return self.net(x)  # (N', 1, ~H/2^(L) - 2, ~W/2^(L) - 2) patch logits


def _init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
