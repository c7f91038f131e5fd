"""Name -> (model class, preset config, weights source), and the backends that load each class.

A *preset* is a named model: a class name (as in ``config.json``'s ``_class_name``), a config for
building it, and where its weights live (local directory, hub id, or none for random-init presets
used in tests and training from scratch). A *backend* adapts one or more classes to the
:class:`~tokenizers_svc.families.base.Backend` contract. Families register both on import.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers_svc.errors import UnsupportedModelError

if TYPE_CHECKING:
    from tokenizers_svc.families.base import Backend

_BACKENDS: dict[str, type[Backend]] = {}
_PRESETS: dict[str, Preset] = {}
_MODEL_CLASSES: dict[str, type] = {}


@dataclass(frozen=True)
class Preset:
    name: str
    class_name: str  # diffusers class or native ModelMixin class, as written in config.json
    config: dict = field(default_factory=dict)  # constructor kwargs when building from scratch
    source: str | None = None  # local dir or hub id holding config.json + safetensors
    subfolder: str | None = None
    description: str = ""
    random_init: bool = False  # may be built with seeded random weights when no weights exist
    modality_hint: str = ""  # filled by listings; the loaded spec is authoritative


def register_backend(backend: type[Backend]) -> type[Backend]:
    for class_name in backend.class_names:
        _BACKENDS[class_name] = backend
    return backend


def register_model_class(model_class: type) -> type:
    """Native (non-diffusers) ModelMixin classes register here so config.json can name them."""
    _MODEL_CLASSES[model_class.__name__] = model_class
    return model_class


def register_preset(preset: Preset) -> Preset:
    if preset.name in _PRESETS:
        raise ValueError(f"preset {preset.name!r} registered twice")
    _PRESETS[preset.name] = preset
    return preset


def _ensure_families_loaded() -> None:
    import tokenizers_svc.defaults  # registers the shipped default tokenizers
    import tokenizers_svc.families  # noqa: F401  (registers backends and presets)


def backend_for(class_name: str) -> type[Backend]:
    _ensure_families_loaded()
    if class_name not in _BACKENDS:
        raise UnsupportedModelError(
            f"no backend for model class {class_name!r}; supported: {sorted(_BACKENDS)}", param="model"
        )
    return _BACKENDS[class_name]


def model_class(class_name: str) -> type:
    """The nn.Module class (diffusers or native) for a config.json ``_class_name``."""
    _ensure_families_loaded()
    if class_name in _MODEL_CLASSES:
        return _MODEL_CLASSES[class_name]
    import diffusers

    if hasattr(diffusers, class_name):
        return getattr(diffusers, class_name)
    raise UnsupportedModelError(f"unknown model class {class_name!r}", param="model")


def get_preset(name: str) -> Preset:
    _ensure_families_loaded()
    if name not in _PRESETS:
        raise UnsupportedModelError(
            f"unknown model {name!r}; expected a preset name (see `tokenizers-svc models`) "
            "or a directory containing config.json",
            param="model",
        )
    return _PRESETS[name]


def list_presets() -> list[Preset]:
    _ensure_families_loaded()
    return list(_PRESETS.values())


def weights_home() -> Path:
    """Where preset weights are looked up by name: ``$TOKENIZERS_SVC_HOME/weights/<preset>``."""
    return Path(os.environ.get("TOKENIZERS_SVC_HOME", Path.home() / ".cache" / "tokenizers-svc")) / "weights"


def local_weights_dir(preset: Preset) -> Path | None:
    """A local directory with this preset's weights, if one exists (never touches the network)."""
    candidates = [weights_home() / preset.name]
    if preset.source and Path(preset.source).exists():
        candidates.insert(0, Path(preset.source) / (preset.subfolder or ""))
    for directory in candidates:
        if (directory / "config.json").is_file():
            return directory
    if preset.source and "/" in preset.source and not Path(preset.source).exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            filename = f"{preset.subfolder}/config.json" if preset.subfolder else "config.json"
            cached = try_to_load_from_cache(preset.source, filename)
        except Exception:
            cached = None
        if isinstance(cached, str):
            return Path(cached).parent
    return None


def read_class_name(directory: Path) -> str:
    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UnsupportedModelError(f"cannot read {config_path.name} in model directory: {exc}") from None
    class_name = config.get("_class_name")
    if not class_name:
        raise UnsupportedModelError("config.json has no '_class_name'; expected a diffusers-format model")
    return class_name
