"""The typed recipe schema: one YAML file describes a whole training run.

A recipe names the model (a registry preset plus config overrides), the data, the optimiser, the
phases (steps, trainable parameters, crop sizes, GAN on/off), the loss weights, EMA, checkpointing,
logging, validation and export. Unknown keys and wrong types are refused before anything is built,
with a message naming the offending key, what was expected and what was received.

Overrides from the command line are ``dotted.key=value`` pairs; the value is parsed as YAML (so
``optim.lr=2e-4`` is a float, ``data.crop_sizes=[64,128]`` a list); a number in the path indexes a
list (``phases.0.steps=100``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tokenizers_svc.errors import ConfigError


class _Strict(BaseModel):
    """Every section refuses unknown keys. Values are checked in pydantic's lax mode, so YAML's
    ``1e-4`` (a string in YAML 1.1) is a float, but ``steps: many`` is an error."""

    model_config = ConfigDict(extra="forbid")


class ModelSection(_Strict):
    preset: str  # registry preset whose class and config are the starting point
    config: dict[str, Any] = Field(default_factory=dict)  # constructor kwargs overriding the preset's
    init_from: str | None = None  # a save_pretrained directory whose weights initialise the model
    # an image model's save_pretrained directory that becomes the per-frame spatial path of a video
    # model built on one (weights and latent statistics copied; the preset's class must support it)
    spatial_init_from: str | None = None
    name: str | None = None  # name written into the exported card (defaults to the recipe name)
    # set config.scaling_factor = 1 / std of the exported model's raw latents on the validation images,
    # so normalized latents have unit variance for diffusion training (what SD's 0.18215 was)
    fit_scaling_factor: bool = True
    # "per_channel": fit latents_mean/std per channel on crops of the first image source at export
    # (training.latent_stats), so normalized latents are centred as well as unit-variance
    latent_statistics: Literal["scalar", "per_channel"] = "scalar"


class SourceSection(_Strict):
    """One training source. ``kind``: image folder (recursive), video folder, WebDataset shards, or
    ``photo_clips``: clips of ``frames`` frames made on the fly from an image folder's photos (still
    shots, pans and zooms, tokenizers_svc.camera)."""

    kind: Literal["images", "videos", "webdataset", "photo_clips"]
    path: str  # folder (images/videos/photo_clips) or a folder / glob of .tar shards (webdataset)
    weight: float = Field(1.0, gt=0)  # relative probability that a batch comes from this source
    include: list[str] = Field(default_factory=list)  # glob patterns on the relative path; empty = all
    exclude: list[str] = Field(default_factory=list)  # glob patterns removed after include
    frames: int = Field(1, ge=1)  # clip length for video sources (images are always one frame)
    frame_stride: int = Field(1, ge=1)  # keep every n-th decoded frame inside a clip
    batch_size: int | None = Field(None, ge=1)  # per-process batch for this source (default: data's)
    # videos: clips start inside [first, last) fractions of each file's duration (held-out segments)
    segment: tuple[float, float] = (0.0, 1.0)

    @model_validator(mode="after")
    def _segment_in_order(self) -> SourceSection:
        first, last = self.segment
        if not 0.0 <= first < last <= 1.0:
            raise ValueError(f"segment must satisfy 0 <= first < last <= 1, got {list(self.segment)}")
        return self


class DataSection(_Strict):
    sources: list[SourceSection] = Field(min_length=1)
    batch_size: int = Field(4, ge=1)  # per-process micro-batch; global = batch_size * processes
    crop_sizes: list[int] = Field(default_factory=lambda: [128], min_length=1)  # one per batch, random
    min_scale: float = Field(0.25, gt=0, le=1)  # random downscale before cropping (multi-scale)
    max_scale: float = Field(1.0, ge=1)  # random upscale before cropping (smooth, enlarged content)
    hflip: bool = True
    num_workers: int = Field(0, ge=0)
    cache_images: int = Field(64, ge=0)  # decoded images kept per worker (small folders decode once)


class ValidationSection(_Strict):
    path: str | None = None  # held-out image folder; None disables validation
    every: int = Field(500, ge=1)  # optimiser steps between validations
    resolution: int = Field(256, ge=8)  # shorter side resized to this, then center-cropped square
    max_images: int = Field(16, ge=1)
    batch_size: int = Field(4, ge=1)


class GanSection(_Strict):
    weight: float = Field(0.5, ge=0)  # multiplies the adaptive weight (taming-transformers' disc_weight)
    start_step: int = Field(0, ge=0)  # generator/discriminator adversarial terms start here
    adaptive: bool = True  # scale by ||grad rec|| / ||grad gan|| at the last decoder layer
    max_adaptive_weight: float = Field(1e4, gt=0)  # clamp of the adaptive ratio (as in taming)
    last_layer: str | None = None  # parameter name of the last decoder layer; None = found automatically
    disc_lr: float = Field(1e-4, gt=0)
    disc_channels: int = Field(64, ge=1)
    disc_layers: int = Field(3, ge=1)


class LossSection(_Strict):
    # "pixels": the losses below on the reconstruction. "frame_latents": MSE between a video model's
    # per-frame latents after its temporal codec and before (models with a fixed per-frame spatial
    # path, e.g. AutoencoderDCVideo): no decoder in the step, so the other terms do not apply
    space: Literal["pixels", "frame_latents"] = "pixels"
    reconstruction: Literal["l1", "l2", "l1+l2"] = "l1"  # l2 is what PSNR measures
    reconstruction_weight: float = Field(1.0, ge=0)
    kl_weight: float = Field(1e-6, ge=0)  # ignored for deterministic tokenizers
    perceptual: Literal["none", "lpips"] = "none"
    perceptual_weight: float = Field(1.0, ge=0)
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    ssim_weight: float = Field(0.0, ge=0)  # weight of (1 - SSIM); 0 disables it
    gan: GanSection | None = None  # None: no discriminator anywhere in the run


class PhaseSection(_Strict):
    """A contiguous span of optimiser steps with its own trainable set, crop sizes and GAN switch."""

    name: str
    steps: int = Field(ge=1)
    trainable: list[str] = Field(default_factory=lambda: ["*"])  # fnmatch patterns on parameter names
    crop_sizes: list[int] | None = None  # overrides data.crop_sizes during this phase
    batch_size: int | None = Field(None, ge=1)  # overrides data.batch_size during this phase
    lr: float | None = Field(None, gt=0)  # overrides optim.lr during this phase
    gan: bool = False  # adversarial loss (needs loss.gan) in this phase


class OptimSection(_Strict):
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)  # linear warmup at the start of each phase
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio at phase end
    grad_clip: float | None = Field(1.0, gt=0)  # max global grad norm; None disables clipping
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimiser step


class EmaSection(_Strict):
    decay: float = Field(0.999, ge=0, lt=1)  # 0 disables EMA (the raw weights are exported)
    warmup: bool = True  # decay_t = min(decay, (1 + t) / (10 + t)) so early averages follow the model


class CheckpointSection(_Strict):
    every: int = Field(500, ge=1)  # optimiser steps between accelerator.save_state
    keep: int = Field(3, ge=1)  # most recent checkpoints kept on disk


class LoggingSection(_Strict):
    every: int = Field(10, ge=1)  # steps between scalar logs
    image_every: int = Field(500, ge=1)  # steps between reconstruction grids
    tensorboard: bool = True


class Recipe(_Strict):
    name: str
    seed: int = 0
    output_dir: str = "runs/${name}"  # ${name} expands to the recipe name
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    # torch intra-op threads of each process when it trains on the CPU; None keeps torch's default
    # (one per core). `accelerate launch --num_cpu_threads_per_process` sets the same thing per launch.
    cpu_threads: int | None = Field(None, ge=1)
    model: ModelSection
    data: DataSection
    phases: list[PhaseSection] = Field(min_length=1)
    optim: OptimSection = Field(default_factory=OptimSection)
    loss: LossSection = Field(default_factory=LossSection)
    ema: EmaSection = Field(default_factory=EmaSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if any(phase.gan for phase in self.phases) and self.loss.gan is None:
            raise ValueError("a phase sets gan: true but loss.gan is not configured")
        if self.loss.space == "frame_latents" and (
            self.loss.gan is not None or self.loss.perceptual != "none"
        ):
            raise ValueError("loss.space frame_latents has no reconstruction for loss.gan or loss.perceptual")
        names = [phase.name for phase in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        return self

    @property
    def total_steps(self) -> int:
        return sum(phase.steps for phase in self.phases)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.replace("${name}", self.name))

    def phase_at(self, step: int) -> tuple[int, PhaseSection, int]:
        """Optimiser step (0-based) -> (phase index, phase, step within the phase)."""
        start = 0
        for index, phase in enumerate(self.phases):
            if step < start + phase.steps:
                return index, phase, step - start
            start += phase.steps
        last = len(self.phases) - 1
        return last, self.phases[last], self.phases[last].steps - 1

    def crop_sizes_at(self, step: int) -> list[int]:
        return self.phase_at(step)[1].crop_sizes or self.data.crop_sizes

    def batch_size_at(self, step: int) -> int:
        return self.phase_at(step)[1].batch_size or self.data.batch_size


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``a.b.c=value`` pairs applied to the raw recipe dict; values parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override must look like dotted.key=value, got {item!r}", param="override")
        parts = key.split(".")
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, ".".join(parts[: depth + 1]), create=True)
        _set(node, parts[-1], yaml.safe_load(value), key)
    return raw


def _child(node: Any, part: str, path: str, create: bool) -> Any:
    if isinstance(node, list):
        index = _index(node, part, path)
        return node[index]
    if not isinstance(node, dict):
        raise ConfigError(f"override {path!r}: {type(node).__name__} value has no keys", param="override")
    if part not in node and create:
        node[part] = {}
    return node[part]


def _set(node: Any, part: str, value: Any, path: str) -> None:
    if isinstance(node, list):
        node[_index(node, part, path)] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise ConfigError(f"override {path!r}: {type(node).__name__} value has no keys", param="override")


def _index(node: list, part: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(
            f"override {path!r}: expected a list index in [0, {len(node)}), got {part!r}", param="override"
        )
    return int(part)


def parse_recipe(raw: dict) -> Recipe:
    """Validate a raw dict; every problem is listed as ``key.path: message (received ...)``."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "<recipe>"
            received = "" if error["type"] == "missing" else f" (received {error.get('input')!r})"
            lines.append(f"  {where}: {error['msg']}{received}")
        raise ConfigError("invalid recipe:\n" + "\n".join(lines), param="recipe") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {str(path)!r}: {exc.strerror}", param="recipe") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path.name} is not valid YAML: {exc}", param="recipe") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path.name} must be a mapping, got {type(raw).__name__}", param="recipe")
    return parse_recipe(apply_overrides(raw, list(overrides or [])))
