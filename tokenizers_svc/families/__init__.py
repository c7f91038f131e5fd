"""Model families, one module each, named as diffusers names the model's file
(``autoencoder_kl_wan.py`` for ``AutoencoderKLWan``; ViTok, a native model, is ``vitok.py``);
:mod:`tokenizers_svc.registry` reads ``FAMILIES``.

Each family module declares ``BACKENDS``, ``PRESETS`` and (native models only) ``MODEL_CLASSES``;
see :mod:`tokenizers_svc.families.base` for the contract.
"""

from tokenizers_svc.families import (
    autoencoder_dc,
    autoencoder_dc_video,
    autoencoder_kl,
    autoencoder_kl_cogvideox,
    autoencoder_kl_cosmos,
    autoencoder_kl_hunyuan_video,
    autoencoder_kl_ltx,
    autoencoder_kl_mochi,
    autoencoder_kl_wan,
    autoencoder_vidtok,
    vitok,
    vq_model,
)

FAMILIES = (
    autoencoder_dc,
    autoencoder_dc_video,
    autoencoder_kl,
    autoencoder_kl_ltx,
    autoencoder_kl_wan,
    autoencoder_kl_hunyuan_video,
    autoencoder_kl_cogvideox,
    autoencoder_kl_cosmos,
    autoencoder_kl_mochi,
    autoencoder_vidtok,
    vitok,
    vq_model,
)
