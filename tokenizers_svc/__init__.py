"""tokenizers-svc: one API over image/video latent tokenizers (VAEs and ViT auto-encoders)."""

from tokenizers_svc.api import Tokenizer
from tokenizers_svc.latents import Latents, latents_from_bytes, load_latents
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.spec import FrameRule, LatentNormalization, TokenizerSpec
from tokenizers_svc.tiling import TilingOptions

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
