"""One truth for the latent normalization constants (issue 25, item 1).

The scalar pair (``scaling_factor``, ``shift_factor``) that ``models --json``, ``info`` and
``/v1/models`` advertise is the model config's; the README's tables state the registry's numbers;
a diffusers user who applies the advertised pair to raw latents gets latents of about unit std.
"""

from __future__ import annotations

import json
import re

import torch
from typer.testing import CliRunner

from tests.helpers import REPO
from tokenizers_svc.cli import app
from tokenizers_svc.crops import load_multiscale
from tokenizers_svc.defaults import DEFAULT_MODELS, DEFAULT_TOKEN_MODELS, PACKAGED_WEIGHTS
from tokenizers_svc.latents import latents_from_bytes
from tokenizers_svc.loading import load_tokenizer

runner = CliRunner()
IMAGE_MODEL = DEFAULT_MODELS["image"]
NUMBER = re.compile(r"-?\d+\.\d+")


def _advertised(name: str) -> dict:
    listing = json.loads(runner.invoke(app, ["models", "--json"]).stdout)
    return next(row for row in listing if row["name"] == name)["normalization"]


def test_advertised_pair_is_the_config_pair(tmp_path, photo_uint8):
    config = json.loads((PACKAGED_WEIGHTS / IMAGE_MODEL / "config.json").read_text())
    pair = {"scaling_factor": config["scaling_factor"], "shift_factor": config["shift_factor"]}
    assert pair["scaling_factor"] != 1.0  # the fitted fallback, not the exact formula's scale
    listed = _advertised(IMAGE_MODEL)
    assert {key: listed[key] for key in pair} == pair
    assert listed["latents_mean"] == config["latents_mean"] and listed["latents_std"] == config["latents_std"]
    tokenizer = load_tokenizer(IMAGE_MODEL)
    served = tokenizer.spec.normalization.constants()  # what /v1/models' scaling_constants holds
    assert {key: served[key] for key in pair} == pair
    # a latent file carries the pair, so `info` shows it without loading the model
    photo = photo_uint8[:64, :64]
    latents = tokenizer.encode(torch.from_numpy(photo).permute(2, 0, 1)[None].contiguous())
    path = tmp_path / "photo.safetensors"
    path.write_bytes(latents.to_bytes())
    summary = json.loads(runner.invoke(app, ["info", str(path), "--json"]).stdout)
    assert {key: summary["scaling_constants"][key] for key in pair} == pair
    assert latents_from_bytes(path.read_bytes()).normalization == tokenizer.spec.normalization
    table = runner.invoke(app, ["models"]).stdout
    row = next(line for line in table.splitlines() if line.startswith(f"{IMAGE_MODEL} "))
    assert f"scalar fallback shift {pair['shift_factor']} scale {pair['scaling_factor']}" in row


def test_diffusers_user_gets_unit_std_from_the_advertised_pair(shared_data):
    """(raw - shift_factor) * scaling_factor, with the pair from `models --json`, on multi-scale
    crops of the validation photos (never fitted on): overall std within 0.7-1.3 (the issue measured
    3.64 with the pair the listing used to show, 1.0/0.0)."""
    listed = _advertised(IMAGE_MODEL)
    tokenizer = load_tokenizer(IMAGE_MODEL)
    crops = load_multiscale(shared_data / "images" / "val").pixels[::16]  # 16 crops of 256x256, all scales
    with torch.no_grad():
        raw = torch.cat([tokenizer.encode(batch, normalize=False).latents for batch in crops.split(2)])
    scaled = (raw - listed["shift_factor"]) * listed["scaling_factor"]
    assert 0.7 <= float(scaled.std()) <= 1.3, float(scaled.std())


def _readme_table(heading: str) -> list[list[str]]:
    """Rows (cells) of the first table after ``heading`` in README.md."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index(heading)
    rows = []
    for line in lines[start:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows


def test_readme_tokenizer_table_states_the_registry_constants():
    """Every scale/shift number in the README's normalization column is a constant of a preset in
    that row, and every preset with a known spec has its scalar pair written there."""
    header, _, *rows = _readme_table("## Tokenizers")
    column = header.index("normalization")
    specs = {
        row["name"]: row.get("normalization")
        for row in json.loads(runner.invoke(app, ["models", "--json"]).stdout)
    }
    checked = 0
    for cells in rows:
        names = [name for name in re.findall(r"`([^`]+)`", cells[0]) if name in specs]
        known = [specs[name] for name in names if specs[name] is not None]
        if not known or len(known) < len(names):
            continue  # hub presets described by no local config: nothing to check against
        numbers = {float(n) for n in NUMBER.findall(cells[column])}
        # 1.0 / 0.0: the exact formula's scale and shift of per-channel models
        constants = {1.0, 0.0} | {float(c[key]) for c in known for key in ("scaling_factor", "shift_factor")}
        assert numbers <= constants, (cells[0], numbers - constants)
        for constant in known:
            for key in ("scaling_factor", "shift_factor"):
                if constant[key] not in (0.0, 1.0):
                    assert constant[key] in numbers, (cells[0], key, constant[key])
        checked += 1
    assert checked >= 10


def test_readme_default_table_states_the_config_pair():
    rows = _readme_table("## Default tokenizers (shipped, trained here)")
    header, cells = rows[0], next(r for r in rows if r[0] == "latent normalization")
    cell = cells[header.index(f"`{IMAGE_MODEL}`")]
    listed = _advertised(IMAGE_MODEL)
    for key in ("scaling_factor", "shift_factor"):
        stated = re.search(rf"`{key}` (-?[\d.]+)", cell)
        assert stated is not None and float(stated.group(1)) == listed[key], (key, cell)


def test_models_names_the_recipe_of_each_default():
    listing = json.loads(runner.invoke(app, ["models", "--json"]).stdout)
    for name in [*DEFAULT_MODELS.values(), *DEFAULT_TOKEN_MODELS.values()]:
        card = json.loads((PACKAGED_WEIGHTS / name / "card.json").read_text())
        row = next(row for row in listing if row["name"] == name)
        assert row["description"].endswith(f"trained by recipe {card['recipe']['name']}"), row["description"]


def test_served_description_names_no_server_directory():
    """/v1/models answers with Tokenizer.describe(): the shipped default's source is its directory's
    name, not the server's path to the package (issue 25, item 11)."""
    info = load_tokenizer(IMAGE_MODEL).describe()
    assert info["source"] == f"model directory {IMAGE_MODEL}"
    assert str(PACKAGED_WEIGHTS) not in json.dumps(info)
