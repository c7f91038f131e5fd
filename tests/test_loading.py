"""tokenizers_svc.loading: a preset, a saved directory and a missing model, each loaded the way the
contract says (weights hash from the files, name from the card, random init only where allowed)."""

from __future__ import annotations

import json

import pytest
import torch

from tokenizers_svc.errors import UnsupportedModelError
from tokenizers_svc.families.base import directory_hash
from tokenizers_svc.loading import build_module, load_tokenizer, resolved_dtype
from tokenizers_svc.registry import get_preset


def test_a_saved_directory_loads_with_its_files_hash_and_its_cards_name(tmp_path):
    build_module(get_preset("sd-vae-tiny"), seed=3).save_pretrained(tmp_path)
    plain = load_tokenizer(tmp_path)
    assert plain.name == tmp_path.name and plain.weights_hash == directory_hash(tmp_path)
    (tmp_path / "card.json").write_text(json.dumps({"name": "my-vae"}))
    assert load_tokenizer(tmp_path).name == "my-vae"


def test_random_init_is_seeded_and_only_where_the_preset_allows_it():
    first, second = load_tokenizer("sd-vae-tiny"), load_tokenizer("sd-vae-tiny")
    assert first.weights_hash == second.weights_hash  # seed 0 both times
    seeded = build_module(get_preset("sd-vae-tiny"), seed=1)
    assert not torch.equal(next(seeded.parameters()), next(first.module.parameters()))
    with pytest.raises(UnsupportedModelError, match="allow_random_init"):
        load_tokenizer("vitok-s-b-16", allow_random_init=False)


def test_auto_dtype_follows_the_device():
    assert resolved_dtype("auto", "cpu") == "float32"
    assert resolved_dtype("auto", "cuda:0") == "bfloat16"
    assert resolved_dtype("float16", "cpu") == "float16"
