"""Recipe schema: every shipped recipe validates; wrong keys/types fail at start naming the key."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from tokenizers_svc.errors import ConfigError
from tokenizers_svc.registry import get_preset
from training.config import apply_overrides, load_recipe, parse_recipe
from training.schedule import lr_at

RECIPES = sorted((Path(__file__).resolve().parents[1] / "training" / "recipes").glob("*.yaml"))


def minimal() -> dict:
    return {
        "name": "t",
        "model": {"preset": "sd-vae-tiny"},
        "data": {"sources": [{"kind": "images", "path": "x"}]},
        "phases": [{"name": "p", "steps": 10}],
    }


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_validate_and_name_known_presets(path):
    recipe = load_recipe(path)  # raises for a recipe the schema refuses
    get_preset(recipe.model.preset)  # raises for unknown presets


def test_unknown_key_is_refused_with_its_path():
    raw = minimal()
    raw["data"]["batchsize"] = 4
    with pytest.raises(ConfigError) as info:
        parse_recipe(raw)
    assert "data.batchsize" in str(info.value)
    assert "Extra inputs are not permitted" in str(info.value)


def test_wrong_type_names_key_expected_and_received():
    raw = minimal()
    raw["phases"][0]["steps"] = "many"
    with pytest.raises(ConfigError) as info:
        parse_recipe(raw)
    message = str(info.value)
    assert "phases.0.steps" in message and "integer" in message and "'many'" in message


def test_literal_choices_are_listed():
    raw = minimal()
    raw["loss"] = {"reconstruction": "l3"}
    with pytest.raises(ConfigError, match=r"loss.reconstruction: Input should be 'l1', 'l2' or 'l1\+l2'"):
        parse_recipe(raw)


def test_gan_phase_needs_gan_section():
    raw = minimal()
    raw["phases"][0]["gan"] = True
    with pytest.raises(ConfigError, match=r"loss\.gan is not configured"):
        parse_recipe(raw)


def test_overrides_dotted_keys_list_indices_and_yaml_values():
    raw = apply_overrides(
        minimal(),
        ["optim.lr=2e-4", "phases.0.steps=7", "data.crop_sizes=[32, 64]", "loss.gan.start_step=3", "seed=5"],
    )
    recipe = parse_recipe(raw)
    assert recipe.optim.lr == pytest.approx(2e-4)
    assert recipe.phases[0].steps == 7
    assert recipe.data.crop_sizes == [32, 64]
    assert recipe.loss.gan is not None and recipe.loss.gan.start_step == 3
    assert recipe.seed == 5


@pytest.mark.parametrize("bad", ["optim.lr", "phases.3.steps=1", "name.x=1"])
def test_bad_overrides_are_config_errors(bad):
    with pytest.raises(ConfigError):
        apply_overrides(minimal(), [bad])


def test_recipe_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    path = tmp_path / "list.yaml"
    path.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="must be a mapping, got list"):
        load_recipe(path)


def test_lr_warmup_then_cosine_per_phase():
    raw = minimal()
    raw["phases"] = [{"name": "a", "steps": 100}, {"name": "b", "steps": 50, "lr": 1e-5}]
    raw["optim"] = {"lr": 1e-3, "warmup_steps": 10, "min_lr_ratio": 0.1}
    recipe = parse_recipe(raw)
    assert lr_at(recipe, 0) == pytest.approx(1e-3 / 11)
    assert lr_at(recipe, 10) == pytest.approx(1e-3)  # warmup done, cosine starts at the peak
    assert lr_at(recipe, 99) == pytest.approx(1e-4, rel=0.01)  # decayed to lr * min_lr_ratio
    assert lr_at(recipe, 100) == pytest.approx(1e-5 / 11)  # phase b restarts its own warmup
    values = [lr_at(recipe, s) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_video_segment_must_be_ordered_fractions():
    raw = minimal()
    raw["data"]["sources"][0]["segment"] = [0.8, 0.2]
    with pytest.raises(ConfigError, match=r"segment must satisfy 0 <= first < last <= 1"):
        parse_recipe(raw)


def test_max_scale_below_one_is_refused():
    raw = minimal()
    raw["data"]["max_scale"] = 0.5
    with pytest.raises(ConfigError, match=r"data.max_scale: Input should be greater than or equal to 1"):
        parse_recipe(raw)
