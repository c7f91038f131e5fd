"""Name or directory -> :class:`~tokenizers_svc.api.Tokenizer`: the one loading path of every entry point.

Beside the registry it reads: a preset name resolves to its local weights directory, a hub id (from
the local cache only when offline), or seeded random weights for presets that allow them. A model
directory holds ``config.json`` (whose ``_class_name`` picks the backend) and safetensors weights, as
written by ``save_pretrained``, plus an optional training card.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import torch

from tokenizers_svc.api import Tokenizer, place_module
from tokenizers_svc.errors import UnsupportedModelError
from tokenizers_svc.families.base import directory_hash
from tokenizers_svc.quantizers import load_quantizer_weights
from tokenizers_svc.registry import (
    Preset,
    backend_for,
    get_preset,
    local_weights_dir,
    model_class,
    read_class_name,
    weights_candidates,
)

CARD_FILE = "card.json"  # written by training next to the exported weights; names the model
HUB_PROBE_TIMEOUT_S = 3.0  # one TCP connect decides whether a download is worth trying


def build_module(preset: Preset, seed: int = 0) -> torch.nn.Module:
    """Instantiate a preset's module from its config with seeded random weights (training, tests)."""
    cls = model_class(preset.class_name)
    config = dict(preset.config)
    quantizer = config.pop("quantizer", None)  # not a constructor argument of any family's class
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = cls(**config)
    if quantizer is not None:  # the backend attaches it, so save_pretrained writes its projections
        module.register_to_config(quantizer=quantizer)
        backend_for(preset.class_name).from_module(module, preset.name)
    return module


def resolved_dtype(dtype: str, device: str | torch.device) -> str:
    """``dtype`` as configured; "auto" becomes :func:`default_dtype` of the device."""
    return default_dtype(device) if dtype == "auto" else dtype


def default_dtype(device: str | torch.device) -> str:
    """The dtype a deployment uses when none is named: bfloat16 on CUDA (1.3-1.5x faster than
    float32 at half the memory, and the shipped image default loses 0.02 dB PSNR against float32 on
    an H200: docs/benchmarks.md), float32 elsewhere (CPU low-precision convolutions are slow or
    unsupported)."""
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def load_tokenizer(
    name_or_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_random_init: bool | None = None,
) -> Tokenizer:
    """Load a tokenizer by preset name, local model directory, or hub id (from the local cache only
    when offline).

    Presets without weights are built with seeded random weights only when ``random_init`` is set
    on the preset (tiny test presets) or ``allow_random_init=True`` is passed.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return load_directory(path, name=directory_name(path), device=device, dtype=dtype)
    preset = get_preset(str(name_or_path))
    weights = local_weights_dir(preset)
    if weights is not None:
        return load_directory(weights, name=preset.name, device=device, dtype=dtype)
    random_init = allow_random_init or (allow_random_init is None and preset.random_init)
    if preset.source and not random_init:
        return load_hub(preset, device=device, dtype=dtype)
    if not random_init:
        raise UnsupportedModelError(
            f"preset {preset.name!r} has no weights; train it (tokenizers-svc train) and load the exported "
            "directory, or pass allow_random_init=True",
            param="model",
        )
    module = place_module(build_module(preset), device, dtype).eval()
    backend = backend_for(preset.class_name).from_module(module, preset.name)
    return Tokenizer(backend, source=f"preset:{preset.name} (random init, seed 0)")


def directory_name(path: Path) -> str:
    """A model directory's name: the card's ``name`` when a training card is present, else the folder."""
    card = path / CARD_FILE
    if card.is_file():
        try:
            return str(json.loads(card.read_text()).get("name") or path.name)
        except (OSError, json.JSONDecodeError):
            pass
    return path.resolve().name


def load_directory(path: Path, *, name: str, device, dtype) -> Tokenizer:
    """A ``save_pretrained`` directory -> Tokenizer; its weights hash is the hash of its files."""
    class_name = read_class_name(path)
    backend_cls = backend_for(class_name)
    try:
        module = model_class(class_name).from_pretrained(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise UnsupportedModelError(
            f"cannot load {class_name} from model directory {path.name!r}: {exc}"
        ) from None
    backend = backend_cls.from_module(module, name, directory_hash(path))
    if backend.attached_quantizer:  # a class with its own codebook (VQModel) has loaded it already
        load_quantizer_weights(backend.quantizer, path)
    place_module(module, device, dtype).eval()
    return Tokenizer(backend, source=str(path))


def hub_unreachable() -> str | None:
    """Why a hub download cannot work right now (offline mode, or no connection to the endpoint
    within a few seconds), else None: one probe instead of the hub client's retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 forbids downloading"
    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"the hub ({constants.ENDPOINT}) cannot be reached ({exc.strerror or type(exc).__name__})"
    return None


def _missing_weights(preset: Preset, reason: str) -> UnsupportedModelError:
    """Where the weights were looked for, why the hub did not help, and what to do."""
    from huggingface_hub import constants

    tried = [str(directory) for directory in weights_candidates(preset)]
    tried.append(os.path.join(constants.HF_HUB_CACHE, f"models--{preset.source.replace('/', '--')}"))
    gated = (
        f"; {preset.source} is a gated repository: accept its license at https://huggingface.co/"
        f"{preset.source} and log in (`huggingface-cli login` or HF_TOKEN) before downloading"
        if preset.gated
        else ""
    )
    return UnsupportedModelError(
        f"weights for {preset.name!r} ({preset.source}) are not available locally (tried "
        f"{', '.join(tried)}) and {reason}{gated}; download them and pass the directory, or place "
        f"them in $TOKENIZERS_SVC_HOME/weights/{preset.name}",
        param="model",
    )


def load_hub(preset: Preset, *, device, dtype) -> Tokenizer:
    """Real hub loading path (``from_pretrained(hub_id)``); when the hub cannot help it fails at
    once, naming the local places that were tried."""
    reason = hub_unreachable()
    if reason is not None:
        raise _missing_weights(preset, reason)
    try:
        module = model_class(preset.class_name).from_pretrained(preset.source, subfolder=preset.subfolder)
    except (OSError, ValueError) as exc:
        raise _missing_weights(preset, f"the download failed ({type(exc).__name__}: {exc})") from None
    place_module(module, device, dtype).eval()
    return Tokenizer(
        backend_for(preset.class_name).from_module(module, preset.name), source=preset.source or ""
    )
