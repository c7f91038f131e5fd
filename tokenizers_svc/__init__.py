"""tokenizers-svc: one API over image/video latent tokenizers (VAEs and ViT auto-encoders).

The names below are imported on first use (PEP 562), so that importing a submodule, e.g. the CLI
for ``tokenizers-svc --help``, does not import torch models and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers_svc.api import Tokenizer
    from tokenizers_svc.latents import Latents, latents_from_bytes, load_latents
    from tokenizers_svc.loading import load_tokenizer
    from tokenizers_svc.spec import FrameRule, LatentNormalization, TokenizerSpec
    from tokenizers_svc.tiling import TilingOptions

_EXPORTS = {
    "FrameRule": "tokenizers_svc.spec",
    "LatentNormalization": "tokenizers_svc.spec",
    "Latents": "tokenizers_svc.latents",
    "TilingOptions": "tokenizers_svc.tiling",
    "Tokenizer": "tokenizers_svc.api",
    "TokenizerSpec": "tokenizers_svc.spec",
    "latents_from_bytes": "tokenizers_svc.latents",
    "load_latents": "tokenizers_svc.latents",
    "load_tokenizer": "tokenizers_svc.loading",
}
__all__ = [
    "FrameRule",
    "LatentNormalization",
    "Latents",
    "TilingOptions",
    "Tokenizer",
    "TokenizerSpec",
    "latents_from_bytes",
    "load_latents",
    "load_tokenizer",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tokenizers_svc' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
