"""Name -> (model class, preset config, weights source), and the backend that wraps each class.

A *preset* is a named model: a class name (as in ``config.json``'s ``_class_name``), a config for
building it, and where its weights live (local directory, hub id, or none for random-init presets
used in tests and training from scratch). A *backend* adapts one or more classes to the
:class:`~tokenizers_svc.families.base.Backend` contract. The tables are built once, on import, from
what every family module and the shipped defaults declare; :mod:`tokenizers_svc.loading` turns a
name into a loaded tokenizer. Listing the registry needs no model class: diffusers and native model
modules are imported by :func:`model_class`, when a model is built.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from tokenizers_svc.defaults import shipped_presets
from tokenizers_svc.errors import UnsupportedModelError
from tokenizers_svc.families import FAMILIES
from tokenizers_svc.families.base import Backend, Preset


def _presets_by_name(presets: list[Preset]) -> dict[str, Preset]:
    table: dict[str, Preset] = {}
    for preset in presets:
        if preset.name in table:
            raise ValueError(f"preset {preset.name!r} declared twice")
        table[preset.name] = preset
    return table


_BACKENDS: dict[str, type[Backend]] = {
    class_name: backend
    for family in FAMILIES
    for backend in family.BACKENDS
    for class_name in backend.class_names
}
_MODEL_MODULES: dict[str, str] = {  # native class name -> the module defining it
    class_name: module
    for family in FAMILIES
    for class_name, module in getattr(family, "MODEL_CLASSES", {}).items()
}
_PRESETS: dict[str, Preset] = _presets_by_name(
    [*(preset for family in FAMILIES for preset in family.PRESETS), *shipped_presets()]
)


def backend_for(class_name: str) -> type[Backend]:
    if class_name not in _BACKENDS:
        raise UnsupportedModelError(
            f"no backend for model class {class_name!r}; supported: {sorted(_BACKENDS)}", param="model"
        )
    return _BACKENDS[class_name]


def model_class(class_name: str) -> type:
    """The nn.Module class (diffusers or native) for a config.json ``_class_name``, its module
    imported on first use. The import runs on the CPU device: callers often ask for a class inside
    ``with torch.device("meta")``, which would make the module's tensor constants (e.g. Cosmos'
    wavelet filters) meta tensors for the rest of the process."""
    import torch

    with torch.device("cpu"):
        if class_name in _MODEL_MODULES:
            return getattr(importlib.import_module(_MODEL_MODULES[class_name]), class_name)
        import diffusers

        if hasattr(diffusers, class_name):
            return getattr(diffusers, class_name)
    raise UnsupportedModelError(f"unknown model class {class_name!r}", param="model")


def get_preset(name: str) -> Preset:
    if name not in _PRESETS:
        raise UnsupportedModelError(
            f"unknown model {name!r}; expected a preset name (see `tokenizers-svc models`) "
            "or a directory containing config.json",
            param="model",
        )
    return _PRESETS[name]


def list_presets() -> list[Preset]:
    return list(_PRESETS.values())


def weights_home() -> Path:
    """Where preset weights are looked up by name: ``$TOKENIZERS_SVC_HOME/weights/<preset>``."""
    return Path(os.environ.get("TOKENIZERS_SVC_HOME", Path.home() / ".cache" / "tokenizers-svc")) / "weights"


def weights_candidates(preset: Preset) -> list[Path]:
    """The local directories that may hold a preset's weights, in the order they are tried."""
    candidates = [weights_home() / preset.name]
    if preset.source and Path(preset.source).exists():
        candidates.insert(0, Path(preset.source) / (preset.subfolder or ""))
    return candidates


def hub_repository(preset: Preset) -> str | None:
    """The hub id of a preset whose weights come from the hub, else None."""
    if preset.source and "/" in preset.source and not Path(preset.source).exists():
        return preset.source
    return None


def local_weights_dir(preset: Preset) -> Path | None:
    """A local directory with this preset's weights, if one exists (never touches the network):
    :func:`weights_candidates`, then the hub cache."""
    for directory in weights_candidates(preset):
        if (directory / "config.json").is_file():
            return directory
    if hub_repository(preset):
        try:
            from huggingface_hub import try_to_load_from_cache

            filename = f"{preset.subfolder}/config.json" if preset.subfolder else "config.json"
            cached = try_to_load_from_cache(preset.source, filename)
        except Exception:
            cached = None
        if isinstance(cached, str):
            return Path(cached).parent
    return None


def preset_config(preset: Preset) -> dict:
    """The config a preset would be built from: local weights' config.json if present, else its own."""
    weights = local_weights_dir(preset)
    if weights is not None:
        return json.loads((weights / "config.json").read_text())
    return dict(preset.config)


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
