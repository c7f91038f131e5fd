"""The contract between the generic :class:`~tokenizers_svc.api.Tokenizer` and a model family.

A family module declares what it adds, and :mod:`tokenizers_svc.registry` collects it:
``BACKENDS`` (:class:`Backend` subclasses), ``PRESETS`` (:class:`Preset` values) and, for native
models that diffusers does not know, ``MODEL_CLASSES`` (class name -> the module defining it,
imported when such a model is built). Families import this module and the spec,
never the registry, so the registry can import every family without a cycle.

A backend does raw compute only: no padding, no normalization, no tiling (the Tokenizer layer does
those once for every family). Inputs it receives already satisfy ``spec`` constraints.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: listing specs needs no torch
    import torch
    from torch import nn

    from tokenizers_svc.quantizers import FSQ, Codebook

from tokenizers_svc.spec import FrameRule, LatentNormalization, TokenizerSpec

# The quantizer's submodule name, as diffusers' VQModel names it; its weights are ``quantize.*``.
# (Not ``quantizer``: that is the config block, and diffusers resolves config names first.)
QUANTIZER_MODULE = "quantize"


@dataclass(frozen=True)
class Preset:
    """A named model: its class, a config to build it, and where its weights live."""

    name: str
    class_name: str  # diffusers class or native ModelMixin class, as written in config.json
    config: dict = field(default_factory=dict)  # constructor kwargs when building from scratch
    source: str | None = None  # local dir or hub id holding config.json + safetensors
    subfolder: str | None = None
    description: str = ""
    random_init: bool = False  # may be built with seeded random weights when no weights exist
    gated: bool = False  # the hub repository needs its license accepted and a login to download


class Backend(ABC):
    """A loaded model plus its self-description.

    ``module`` is the trainable ``nn.Module`` (a diffusers ``ModelMixin`` for every family, so
    ``save_pretrained``/``from_pretrained`` work the same way everywhere).
    """

    #: diffusers/native class names this backend loads (read from ``config.json`` ``_class_name``)
    class_names: tuple[str, ...] = ()
    #: True when the model itself runs long clips a few frames at a time through a causal cache, so
    #: temporal chunking would only add error (tiling then splits such models in space only)
    streams_frames: bool = False
    #: True when inference runs hot input shapes as traced graphs (:mod:`tokenizers_svc.traced`); a
    #: family opts in once tests/test_traced.py shows its traced calls equal eager on new content
    traced_inference: bool = False

    def __init__(self, module: nn.Module, spec: TokenizerSpec, weights_hash: str | None = None) -> None:
        from tokenizers_svc.traced import TracedCalls  # deferred: listing specs imports no torch

        self.module = module
        self.spec = spec.with_quantizer(module.config)
        self._weights_hash = weights_hash
        # what inference (tokenizers_svc.tiling) calls: pixel_moments / decode_latents, traced per
        # hot shape where the family opted in; training calls encode_moments / decode_latents
        self.inference_moments = (
            TracedCalls(self.pixel_moments, module, f"{self.spec.name} encode")
            if self.traced_inference
            else self.pixel_moments
        )
        self.inference_pixels = (
            TracedCalls(self.decode_latents, module, f"{self.spec.name} decode")
            if self.traced_inference
            else self.decode_latents
        )
        # True when this backend added the quantizer to a class that does not know it: its saved
        # weights are then the loader's to read (loading.load_directory), not diffusers'
        self.attached_quantizer = False
        if self.spec.quantizer is not None and QUANTIZER_MODULE not in dict(module.named_children()):
            from tokenizers_svc.quantizers import build_quantizer

            parameter = next(module.parameters())
            quantizer = build_quantizer(self.spec.quantizer, self.spec.latent_channels)
            module.add_module(QUANTIZER_MODULE, quantizer.to(device=parameter.device, dtype=parameter.dtype))
            self.attached_quantizer = True

    @property
    def quantizer(self) -> FSQ | Codebook | None:
        """The discrete bottleneck the spec declares (a submodule of ``module``, so it trains,
        saves and moves with it), or None for a continuous tokenizer."""
        return self.module.get_submodule(QUANTIZER_MODULE) if self.spec.quantizer is not None else None

    @classmethod
    @abstractmethod
    def spec_from_config(cls, config: Mapping, name: str) -> TokenizerSpec:
        """The spec of a module built from ``config`` (a saved ``config.json``, or a preset's config,
        which states every key read here), so the registry can describe a model without building it."""

    @classmethod
    def spec_from_export(cls, directory: Path, config: Mapping, name: str) -> TokenizerSpec:
        """The spec of saved weights (``directory`` with ``config``, its config.json), without loading
        them: :meth:`spec_from_config`, plus what a family keeps in the weights file."""
        return cls.spec_from_config(config, name)

    @classmethod
    def described_spec(cls, config: Mapping, name: str, directory: Path | None = None) -> TokenizerSpec:
        """What a backend built from ``config`` (with the weights in ``directory``, when given) states,
        without building it: the family's spec plus the config's ``quantizer`` block, as ``__init__``
        adds it. The model listing and the trainer's card describe models this way."""
        spec = (
            cls.spec_from_config(config, name)
            if directory is None
            else cls.spec_from_export(directory, config, name)
        )
        return spec.with_quantizer(config)

    @classmethod
    def meta_module(cls, module_class: type, config: Mapping) -> nn.Module:
        """``module_class`` built from ``config`` on the meta device: shapes, no storage, no init
        (:mod:`tokenizers_svc.model_stats` counts parameters and compute on it). A family whose class
        needs real values while it is constructed overrides this."""
        import torch

        with torch.device("meta"):
            return module_class.from_config(config)

    @classmethod
    def from_module(cls, module: nn.Module, name: str, weights_hash: str | None = None) -> Backend:
        """Wrap an instantiated module; the spec is read from ``module.config``. ``weights_hash``:
        known when the weights came from files (:func:`directory_hash`), else hashed on first use."""
        return cls(module, cls.spec_from_config(module.config, name), weights_hash)

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (N, C, H, W) or (N, C, T, H, W) float in [-1, 1], valid size -> raw (mean, logvar|None),
        each (N, c, [t,] h, w).

        Deterministic tokenizers return ``logvar=None``; ``mean`` is then the latent itself. Every
        module here answers ``encode`` as diffusers' autoencoders do: an ``AutoencoderKLOutput`` (its
        ``latent_dist``, a ``DiagonalGaussianDistribution``) or, deterministic, an ``EncoderOutput``
        (``latent``); a family whose model differs overrides this.
        """
        output = self.module.encode(x)
        if hasattr(output, "latent_dist"):
            return output.latent_dist.mean, output.latent_dist.logvar
        return output.latent, None

    def pixel_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`encode_moments` of x as inference hands it over: float in [-1, 1] in the module's
        dtype, or uint8 [0, 255], converted here. Why here: where the family traces, the conversion
        is then part of the traced graph, which runs without the GIL; three eager ops would each
        hand the GIL to the server's other threads and wait to get it back (~2.6 ms per 256² call
        in a replica at concurrency 4, py-spy, against ~0.3 ms alone)."""
        if not x.is_floating_point():
            from tokenizers_svc.pixels import to_float_pixels  # deferred: listing specs imports no torch

            x = to_float_pixels(x).to(self.dtype)  # (N, C, [T,] H, W) float [-1, 1]
        return self.encode_moments(x)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """z: raw latents (N, c, h, w) or (N, c, t, h, w) -> pixels (N, C, [T,] H, W) float, nominally
        [-1, 1]: ``decode(z).sample``, diffusers' ``DecoderOutput``."""
        return self.module.decode(z).sample

    def forget_traced(self) -> None:
        """Drop traced graphs: the module moved to another device or dtype."""
        from tokenizers_svc.traced import TracedCalls

        for calls in (self.inference_moments, self.inference_pixels):
            if isinstance(calls, TracedCalls):
                calls.clear()

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @property
    def weights_hash(self) -> str:
        """sha256 of the weights (computed once); identifies exactly which model made a latent."""
        if self._weights_hash is None:
            self._weights_hash = state_dict_hash(self.module)
        return self._weights_hash

    def save_pretrained(self, path: str | Path) -> None:
        self.module.save_pretrained(str(path))


def group_norm_min_latent_size(channels: Iterable[int], groups: int) -> int:
    """The smallest latent side a network normalizing these channel widths with ``GroupNorm(groups)``
    takes. GroupNorm needs more than one value per group: a group of a single channel holds one
    value at a 1x1 feature map (the deepest level of a one-latent-cell input), so such a network
    needs 2x2 latents; groups of two or more channels work at 1x1."""
    return 1 if min(channels) // groups >= 2 else 2


class CausalVideoVAEBackend(Backend):
    """What the diffusers causal video VAEs share (Wan, HunyuanVideo, CogVideoX, Cosmos, Mochi; one file
    each, named as diffusers names the model's file): the spec, read from the model's own config.

    Every such model encodes (N, 3, T, H, W) float [-1, 1] clips with ``T = 1 + k * t`` (the first
    frame alone, then groups of ``t`` frames: a causal :class:`~tokenizers_svc.spec.FrameRule`) into
    (N, c, 1 + k, H / f, W / f) latents, and decodes them back to ``1 + k * t`` frames; an image is a
    one-frame clip. Each adapter reads compression, channels and the latent normalization its
    diffusers pipeline applies from the model's own ``config.json``, so a hub checkpoint and a tiny
    random-init preset go through the same code:

    ============  =========  ====  ==========================================  =========================
    family        rule       f     normalized latents (as the pipeline does)   config fields
    ============  =========  ====  ==========================================  =========================
    Wan 2.1       1 + 4k     8     ``(z - mean[c]) / std[c]``                  latents_mean/latents_std
    HunyuanVideo  1 + 4k     8     ``z * scaling_factor``                      scaling_factor
    CogVideoX     1 + 4k     8     ``z * scaling_factor``                      scaling_factor
    Cosmos 1.0    1 + 8k     8     ``(z - mean[c]) / std[c] * sigma_data``     latents_mean/latents_std
    Mochi 1       1 + 6k     8     ``(z - mean[c]) / std[c] * scaling_factor`` latents_mean/latents_std
    ============  =========  ====  ==========================================  =========================

    Cosmos is deterministic (no posterior); the others are KL models (mean, logvar). Cosmos 1.0 ships
    per-(channel, latent frame) stats, reduced here to per-channel ones (see ``autoencoder_kl_cosmos.CosmosVAEBackend``).
    Pixel input is always RGB (Mochi's ``in_channels=15`` counts its internal Fourier features).
    """

    family = ""
    is_kl = True

    @classmethod
    def spec_from_config(cls, config: Mapping, name: str) -> TokenizerSpec:
        spatial, temporal = cls.compression(config)
        return TokenizerSpec(
            name=name,
            family=cls.family,
            modality="video",
            spatial_compression=spatial,
            latent_channels=cls.latent_channels(config),
            frame_rule=FrameRule(temporal_compression=temporal, causal=True),
            normalization=cls.normalization(config),
            is_kl=cls.is_kl,
            in_channels=3,  # RGB for every family (see the class docstring)
            min_latent_size=cls.min_latent_size(config),
        )

    @staticmethod
    def compression(cfg) -> tuple[int, int]:
        """(spatial, temporal) compression from the model config."""
        raise NotImplementedError

    @staticmethod
    def latent_channels(cfg) -> int:
        return int(cfg["latent_channels"])

    @staticmethod
    def min_latent_size(cfg) -> int:
        """Smallest latent side (see :func:`group_norm_min_latent_size`); 1 for families whose
        normalization works on one value (Wan's RMS norm, Cosmos' one-group GroupNorm)."""
        return 1

    @staticmethod
    def normalization(cfg) -> LatentNormalization:
        raise NotImplementedError

    @classmethod
    def presets(cls, hub: tuple[str, str, str], tiny: tuple[str, dict, str]) -> tuple[Preset, Preset]:
        """The family's two presets: ``hub`` = (name, hub id, description), the released checkpoint's
        ``vae`` subfolder; ``tiny`` = (name, config, description), the same class at a few hundred
        thousand parameters, random init, f8 and the real temporal rule, so every code path (causal
        caches, frame batching) runs on CPU in about a second. A tiny config states the keys its spec
        reads (the class defaults), so the registry lists it from config."""
        (hub_name, source, hub_description), (tiny_name, config, tiny_description) = hub, tiny
        class_name = cls.class_names[0]
        return (
            Preset(hub_name, class_name, source=source, subfolder="vae", description=hub_description),
            Preset(tiny_name, class_name, config=config, description=tiny_description, random_init=True),
        )


# Non-trivial per-channel stats for the tiny random-init video presets, so a normalization round trip
# can fail.
TINY_LATENT_MEAN = [0.1, -0.2, 0.3, 0.05]
TINY_LATENT_STD = [1.5, 0.5, 0.8, 1.2]


def state_dict_hash(module: nn.Module) -> str:
    import torch

    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def directory_hash(path: Path) -> str:
    """sha256 over config.json and the weight files of a model directory (cheaper than tensors)."""
    digest = hashlib.sha256()
    for file in sorted([*path.glob("config.json"), *path.glob("*.safetensors"), *path.glob("*.bin")]):
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
