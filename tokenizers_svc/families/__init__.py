"""Model families. Importing this package registers every backend and preset."""

from tokenizers_svc.families import diffusers_vae  # noqa: F401
