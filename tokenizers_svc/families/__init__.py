"""Model families. Importing this package registers every backend and preset."""

from tokenizers_svc.families import (
    dcae,  # noqa: F401
    diffusers_vae,  # noqa: F401
    ltx_video,  # noqa: F401
    video_vaes,  # noqa: F401
    vitok,  # noqa: F401
)
