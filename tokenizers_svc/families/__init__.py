"""Model families, one module each; :mod:`tokenizers_svc.registry` reads ``FAMILIES``.

Each family module declares ``BACKENDS``, ``PRESETS`` and (native models only) ``MODEL_CLASSES``;
see :mod:`tokenizers_svc.families.base` for the contract.
"""

from tokenizers_svc.families import dcae, diffusers_vae, ltx_video, video_vaes, vitok

FAMILIES = (dcae, diffusers_vae, ltx_video, video_vaes, vitok)
