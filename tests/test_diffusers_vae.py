"""The SD-family presets carry their published architectures (checked on the meta device, no weights)."""

from __future__ import annotations

import pytest

from tokenizers_svc.errors import UnsupportedModelError
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.model_stats import meta_backend, preset_stats
from tokenizers_svc.registry import get_preset


@pytest.mark.parametrize(
    ("name", "params", "channels", "scale", "shift"),
    [
        ("sd-vae-ft-mse", 83_653_863, 4, 0.18215, 0.0),  # parameter count of the released checkpoint
        ("sdxl-vae", 83_653_863, 4, 0.13025, 0.0),
        ("flux-vae", 83_819_683, 16, 0.3611, 0.1159),
    ],
)
def test_published_architecture(name, params, channels, scale, shift):
    spec = meta_backend(get_preset(name)).spec
    assert (spec.spatial_compression, spec.latent_channels) == (8, channels)
    assert (spec.normalization.scale, spec.normalization.shift) == (scale, shift)
    assert preset_stats(name).params == params


def test_hub_preset_without_local_weights_is_refused_not_random(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_SVC_HOME", str(tmp_path))
    with pytest.raises(UnsupportedModelError, match="weights"):
        load_tokenizer("sd-vae-ft-mse")
