"""The embedded default tokenizers: trained by this project, shipped inside the package.

They are what the CLI, the server, the batch job and the eval script use when no model is named, so
a fresh clone works offline. Each lives in ``tokenizers_svc/weights/<name>/`` as a ``save_pretrained``
directory plus the training card (``card.json``); the recipe that produced it is named in the card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from tokenizers_svc.errors import UnsupportedModelError
from tokenizers_svc.families.base import Preset
from tokenizers_svc.formats import is_video_file

PACKAGED_WEIGHTS = Path(__file__).resolve().parent / "weights"

Modality = Literal["image", "video"]

DEFAULT_MODELS: dict[str, str] = {
    "image": "tsvc-image-f8c4",  # training/recipes/default-image.yaml
    "video": "tsvc-video-f8t4c4",  # training/recipes/cpu-video-dcae.yaml (over the image default)
}
# The discrete (token-id) default per modality: what ``--tokens`` / ``tokens=True`` uses when no model
# is named, since a continuous default has no ids to give.
DEFAULT_TOKEN_MODELS: dict[str, str] = {
    "image": "tsvc-image-f8-fsq1000",  # training/recipes/default-image-fsq.yaml
}
# Shipped, but no longer a default: loadable by name (and servable: add it to a serving config), so
# latent files made with it decode as before.
PREVIOUS_MODELS: dict[str, str] = {
    "tsvc-video-f16t4c16": "video",  # training/recipes/default-video.yaml; the video default until 2026-12-04
}


def default_model(modality: Modality, tokens: bool = False) -> str:
    """The shipped tokenizer for ``modality`` (its discrete one with ``tokens``); a clear error when
    this checkout has none."""
    kind = "discrete " if tokens else ""
    name = (DEFAULT_TOKEN_MODELS if tokens else DEFAULT_MODELS).get(modality)
    if name is None:
        raise UnsupportedModelError(
            f"no {kind}{modality} tokenizer is shipped; name a model with a quantizer (see "
            '`tokenizers-svc models` and docs/models.md, "Discrete tokens")',
            param="model",
        )
    if not (PACKAGED_WEIGHTS / name / "config.json").is_file():
        raise UnsupportedModelError(
            f"no default {kind}{modality} tokenizer is shipped in this checkout (expected weights in "
            f"tokenizers_svc/weights/{name}); name a model explicitly (see `tokenizers-svc models`)",
            param="model",
        )
    return name


def default_model_for(paths, tokens: bool = False) -> str:
    """The shipped video tokenizer when any of ``paths`` is a video (by suffix), else the image one;
    the discrete one with ``tokens``."""
    return default_model("video" if any(is_video_file(path) for path in paths) else "image", tokens)


def _provenance(card: dict) -> str:
    """Which recipe made the weights: the name in the training card's recipe (its last run's)."""
    recipe = card.get("recipe", {}).get("name")
    return "no training card" if recipe is None else f"trained by recipe {recipe}"


def shipped_presets() -> list[Preset]:
    """A preset for each default tokenizer whose weights this checkout ships (read by the registry)."""
    presets = []
    shipped = [(modality, name, "default") for modality, name in DEFAULT_MODELS.items()]
    shipped += [(modality, name, "discrete default") for modality, name in DEFAULT_TOKEN_MODELS.items()]
    shipped += [(modality, name, "previous default") for name, modality in PREVIOUS_MODELS.items()]
    for modality, name, role in shipped:
        directory = PACKAGED_WEIGHTS / name
        config_path = directory / "config.json"
        if not config_path.is_file():
            continue
        config = json.loads(config_path.read_text())
        card_path = directory / "card.json"
        card = json.loads(card_path.read_text()) if card_path.is_file() else {}
        presets.append(
            Preset(
                name=name,
                class_name=config["_class_name"],
                config={k: v for k, v in config.items() if not k.startswith("_")},
                source=str(directory),
                description=f"{role} {modality} tokenizer, {_provenance(card)}",
            )
        )
    return presets
