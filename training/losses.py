"""Training losses on float pixels in [-1, 1], (N, 3, H, W) or (N, 3, T, H, W).

Each function returns a scalar; the trainer logs every term separately. Video tensors are folded to
frames ``(N*T, 3, H, W)`` for the 2-D terms (SSIM, LPIPS, the patch discriminator).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_svc.errors import ConfigError
from tokenizers_svc.metrics import load_lpips, lpips_missing, ssim_per_image


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


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Differentiable mean SSIM of two [-1, 1] tensors: the metric's definition
    (:func:`tokenizers_svc.metrics.ssim_per_image`) on [0, 1] pixels, averaged over images and frames."""
    a, b = (frames_2d(x).float() + 1) / 2, (frames_2d(y).float() + 1) / 2  # (M, C, H, W) in [0, 1]
    return ssim_per_image(a, b, peak=1.0).mean()


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


class Perceptual(nn.Module):
    """LPIPS, built only from weights already on disk (:func:`tokenizers_svc.metrics.load_lpips`, the
    loader the evaluation uses). If the package or the backbone is missing the run stops before
    training with instructions, so a run never silently downloads or trains without the loss it asked for.
    """

    def __init__(self, net: str) -> None:
        super().__init__()
        missing = lpips_missing(net)
        if missing is not None:
            raise ConfigError(
                f"loss.perceptual=lpips (net {net}) needs {missing}; or set loss.perceptual=none",
                param="loss.perceptual",
            )
        self.model = load_lpips(net)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(frames_2d(x).float(), frames_2d(y).float()).mean()  # inputs in [-1, 1]
