"""Training losses on float pixels in [-1, 1], (N, 3, H, W) or (N, 3, T, H, W).

Each function returns a scalar; the trainer logs every term separately. Video tensors are folded to
frames ``(N*T, 3, H, W)`` for the 2-D terms (SSIM, LPIPS, the patch discriminator).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_svc.errors import ConfigError

SSIM_WINDOW = 11  # Wang et al. 2004: Gaussian window 11, sigma 1.5
SSIM_SIGMA = 1.5
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2  # (K * L)^2 with data range L = 1 after mapping to [0, 1]
LPIPS_BACKBONES = {  # torchvision checkpoint file each lpips net loads from the torch hub cache
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def frames_2d(x: torch.Tensor) -> torch.Tensor:
    """(N, C, T, H, W) -> (N*T, C, H, W); images pass through."""
    if x.ndim == 5:
        n, c, t, h, w = x.shape
        return x.transpose(1, 2).reshape(n * t, c, h, w)
    return x


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, kind: str) -> torch.Tensor:
    """``kind``: "l1", "l2" (mean squared error, what PSNR measures) or "l1+l2" (their sum)."""
    terms = {"l1": lambda: F.l1_loss(recon, x), "l2": lambda: F.mse_loss(recon, x)}
    return sum(terms[part]() for part in kind.split("+"))


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over latent elements, averaged over the batch."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


def _gaussian(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Differentiable mean SSIM of two [-1, 1] tensors (Gaussian 11/1.5, valid region, per channel)."""
    a, b = (frames_2d(x).float() + 1) / 2, (frames_2d(y).float() + 1) / 2  # (M, C, H, W) in [0, 1]
    c = a.shape[1]
    g = _gaussian(SSIM_WINDOW, SSIM_SIGMA, a.device, a.dtype)
    kh = g.reshape(1, 1, -1, 1).expand(c, 1, -1, 1)
    kw = g.reshape(1, 1, 1, -1).expand(c, 1, 1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable, valid: (M, C, H-10, W-10)
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return (num / den).mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float
) -> torch.Tensor:
    """||d rec / d W_last|| / ||d gan / d W_last|| (taming-transformers' VQGAN), detached and clamped."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def torch_hub_checkpoints() -> Path:
    return Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"


class Perceptual(nn.Module):
    """LPIPS through the ``lpips`` package, built only from weights already on disk.

    The ``lpips`` package ships its linear heads; the backbone comes from torchvision's checkpoint in
    the torch hub cache. If either is missing the run stops before training with instructions, so a
    run never silently downloads or trains without the loss it asked for.
    """

    def __init__(self, net: str) -> None:
        super().__init__()
        checkpoint = torch_hub_checkpoints() / LPIPS_BACKBONES[net]
        try:
            import lpips
        except ModuleNotFoundError:
            raise ConfigError(
                "loss.perceptual=lpips needs the `lpips` package (pip install lpips) and the "
                f"{net} backbone weights at {checkpoint}; install both, or set loss.perceptual=none",
                param="loss.perceptual",
            ) from None
        if not checkpoint.is_file():
            raise ConfigError(
                f"loss.perceptual=lpips (net {net}) needs torchvision's backbone weights at {checkpoint} "
                f"(copy {LPIPS_BACKBONES[net]} there from a machine with network access, or set TORCH_HOME "
                "to a folder whose hub/checkpoints has it); or set loss.perceptual=none",
                param="loss.perceptual",
            )
        self.model = lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(frames_2d(x).float(), frames_2d(y).float()).mean()  # inputs in [-1, 1]
