"""The model being trained: a preset built from the recipe, seen as one autoencoder by the losses.

Any family trains through its backend's ``encode_moments``/``decode_latents``, so the trainer never
branches on the family.
"""

from __future__ import annotations

import fnmatch
from dataclasses import replace
from pathlib import Path

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from tokenizers_svc.errors import ConfigError
from tokenizers_svc.families.base import Backend
from tokenizers_svc.loading import build_module
from tokenizers_svc.quantizers import load_quantizer_weights
from tokenizers_svc.registry import backend_for, get_preset, model_class
from tokenizers_svc.spec import VQ_KIND
from training.config import PhaseSection, Recipe


def build_backend(recipe: Recipe) -> Backend:
    """The recipe's preset with its config overrides, seeded random init (or ``init_from`` weights),
    wrapped in the family backend so that any family trains through encode_moments/decode_latents."""
    preset = get_preset(recipe.model.preset)
    name = recipe.model.name or recipe.name
    if recipe.model.init_from:
        module = model_class(preset.class_name).from_pretrained(recipe.model.init_from)
        if module.config.get("quantizer"):  # a discrete model trains on, its codes unchanged
            return _discrete_continued(module, preset.class_name, recipe, name)
        if "quantizer" in recipe.model.config:  # a continuous model becomes a discrete one
            return _quantized_from_continuous(
                module, preset.class_name, recipe.model.config["quantizer"], name
            )
    elif recipe.model.spatial_init_from:
        cls = model_class(preset.class_name)
        if not hasattr(cls, "from_image_model"):
            raise ConfigError(
                f"{preset.class_name} has no per-frame spatial path to initialise from an image model",
                param="model.spatial_init_from",
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)  # the temporal layers' random init
            module = cls.from_image_model(
                recipe.model.spatial_init_from, **{**preset.config, **recipe.model.config}
            )
    else:
        try:
            module = build_module(
                replace(preset, config={**preset.config, **recipe.model.config}), seed=recipe.seed
            )
        except TypeError as exc:
            raise ConfigError(
                f"model.config does not fit {preset.class_name}: {exc}", param="model.config"
            ) from None
    backend = backend_for(preset.class_name).from_module(module, name)
    if backend.spec.quantizer is not None and backend.spec.quantizer.kind == VQ_KIND:
        raise ConfigError(
            f"{preset.class_name} learns its codebook with codebook and commitment losses this trainer "
            "does not have; it encodes and decodes only (an FSQ quantizer block trains)",
            param="model.preset",
        )
    return backend


def _discrete_continued(module: nn.Module, class_name: str, recipe: Recipe, name: str) -> Backend:
    """A trained discrete model (an export with a quantizer) with its projections loaded, to train
    on. A recipe that names a quantizer must name the one the model has: other levels would be a
    different vocabulary, not a continuation."""
    saved = dict(module.config["quantizer"])
    asked = recipe.model.config.get("quantizer")
    if asked is not None and any(saved.get(key) != value for key, value in asked.items()):
        raise ConfigError(
            f"model.init_from {recipe.model.init_from!r} has the quantizer {saved}; the recipe asks for "
            f"{asked}. Drop model.config.quantizer to continue that model, or start from a continuous one",
            param="model.config.quantizer",
        )
    backend = backend_for(class_name).from_module(module, name)
    load_quantizer_weights(backend.quantizer, Path(recipe.model.init_from))
    return backend


def _quantized_from_continuous(module: nn.Module, class_name: str, quantizer: dict, name: str) -> Backend:
    """A trained continuous model with a quantizer added. When the model has fitted per-channel
    latent statistics and the quantizer a square projection, the projection starts as that
    normalization (latents enter the tanh bound centred and unit-scaled, so every level is reached
    from the first step) and the way back as its inverse; the statistics, which describe the
    continuous latents, are dropped from the config, with the shift of their scalar fallback (the
    quantized latents are normalized by ``scaling_factor`` alone, refit at export)."""
    config = module.config
    mean, std = config.get("latents_mean"), config.get("latents_std")
    module.register_to_config(quantizer=quantizer)
    backend = backend_for(class_name).from_module(module, name)
    fsq = backend.quantizer
    if mean is not None and std is not None and fsq.project_in is not None:
        mean_t, std_t = torch.tensor(mean), torch.tensor(std)
        if fsq.project_in.weight.shape == (len(mean), len(mean)):
            with torch.no_grad():
                fsq.project_in.weight.copy_(torch.diag(1 / std_t))
                fsq.project_in.bias.copy_(-mean_t / std_t)
                fsq.project_out.weight.copy_(torch.diag(std_t))
                fsq.project_out.bias.copy_(mean_t)
            module.register_to_config(latents_mean=None, latents_std=None, shift_factor=None)
    return backend


class Autoencoder(nn.Module):
    """Training view of a backend: pixels -> (reconstruction, posterior mean, logvar | None).

    The backend's module is a submodule, so DDP (via ``accelerator.prepare``) sees every parameter.
    """

    def __init__(self, backend: Backend, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.module = backend.module
        self.backend = backend
        self.rank, self.world_size = rank, world_size

    def forward(
        self, x: torch.Tensor, frame_latents: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """-> (reconstruction like x, posterior mean, logvar | None, token ids | None). A quantized
        model decodes its rounded codes (straight-through gradients) and has no posterior noise.
        ``frame_latents``: (prediction, target, None, None) of the backend's per-frame latent
        objective (``loss.space: frame_latents``), each (N, c, T, h, w), instead."""
        if frame_latents:
            if not hasattr(self.backend, "frame_latent_objective"):
                raise ConfigError(
                    f"{self.backend.spec.family} has no per-frame latent objective; use loss.space: pixels",
                    param="loss.space",
                )
            return (*self.backend.frame_latent_objective(x), None, None)
        mean, logvar = self.backend.encode_moments(x)  # (N, c, [t,] h, w) each
        quantizer = self.backend.quantizer
        if quantizer is not None:
            z, codes = quantizer(mean)  # decoder input (N, c, ...), codes (N, K, ...)
            ids = quantizer.codes_to_ids(codes.detach())  # (N, [t,] h, w) int32
            return self.backend.decode_latents(z), mean, None, ids
        z = mean
        if logvar is not None:  # diffusers' posterior, drawn with this rank's share of the global noise
            posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
            z = posterior.mean + posterior.std * self.posterior_noise(mean)
        return self.backend.decode_latents(z), mean, logvar, None  # recon like x, float

    def posterior_noise(self, mean: torch.Tensor) -> torch.Tensor:
        """Noise for this process's slice of the *global* batch: every process draws the global
        batch's noise and keeps its rows, so the run is the same for any number of processes (why the
        draw is not ``DiagonalGaussianDistribution.sample``, which draws only this process's rows)."""
        n = mean.shape[0]
        noise = torch.randn((n * self.world_size, *mean.shape[1:]), device=mean.device, dtype=mean.dtype)
        return noise[self.rank * n : (self.rank + 1) * n]


def last_layer_name(module: nn.Module, configured: str | None) -> str:
    """The decoder's last weight (for the adaptive GAN weight): the configured name, else the last
    >= 2-D weight named like an output layer (``conv_out``, ``to_pixels``) after the encoder's,
    else the last >= 2-D weight under ``decoder``."""
    names = [name for name, p in module.named_parameters() if p.ndim >= 2]
    if configured:
        if configured not in names:
            raise ConfigError(
                f"loss.gan.last_layer {configured!r} is not a weight of the model; e.g. {names[-3:]}",
                param="loss.gan.last_layer",
            )
        return configured
    outputs = [n for n in names if not n.startswith("encoder.") and ("conv_out" in n or "to_pixels" in n)]
    decoder = [n for n in names if n.startswith("decoder.")]
    return (outputs or decoder or names)[-1]


def phase_parameters(module: nn.Module, phase: PhaseSection) -> list[nn.Parameter]:
    params = [
        p
        for name, p in module.named_parameters()
        if any(fnmatch.fnmatch(name, pat) for pat in phase.trainable)
    ]
    if not params:
        raise ConfigError(
            f"phase {phase.name!r}: trainable patterns {phase.trainable} match no parameter "
            f"(names look like {next(iter(dict(module.named_parameters())))!r})",
            param="phases.trainable",
        )
    return params
