"""tokenizers_svc.registry: every preset has a backend, unknown names fail with a hint, and a preset's
weights are found in $TOKENIZERS_SVC_HOME without the network."""

from __future__ import annotations

import json

import pytest

from tokenizers_svc.errors import UnsupportedModelError
from tokenizers_svc.registry import (
    backend_for,
    get_preset,
    list_presets,
    local_weights_dir,
    preset_config,
    read_class_name,
)


def test_every_preset_has_a_backend_and_a_spec_from_its_config_alone():
    for preset in list_presets():
        backend = backend_for(preset.class_name)
        assert preset.class_name in backend.class_names
        if preset.config:  # listed without building the model
            spec = backend.spec_from_config(preset_config(preset), preset.name)
            assert spec.name == preset.name and spec.latent_channels > 0


def test_unknown_names_and_classes_are_refused_with_what_is_supported():
    with pytest.raises(UnsupportedModelError, match="tokenizers-svc models"):
        get_preset("no-such-model")
    with pytest.raises(UnsupportedModelError, match="AutoencoderKL"):
        backend_for("NoSuchAutoencoder")


def test_weights_in_the_home_directory_are_found_and_their_config_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_SVC_HOME", str(tmp_path))
    preset = get_preset("sd-vae-tiny")
    assert local_weights_dir(preset) is None
    directory = tmp_path / "weights" / "sd-vae-tiny"
    directory.mkdir(parents=True)
    config = {**preset.config, "_class_name": "AutoencoderKL", "scaling_factor": 0.5}
    (directory / "config.json").write_text(json.dumps(config))
    assert local_weights_dir(preset) == directory
    assert preset_config(preset)["scaling_factor"] == 0.5
    assert read_class_name(directory) == "AutoencoderKL"


def test_a_directory_without_a_class_name_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UnsupportedModelError, match="_class_name"):
        read_class_name(tmp_path)
    with pytest.raises(UnsupportedModelError, match="cannot read"):
        read_class_name(tmp_path / "missing")
