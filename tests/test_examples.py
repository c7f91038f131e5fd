"""The sample media a clone has (issue 25, item 4): small, licensed, and what the tiny recipes read."""

from __future__ import annotations

import pytest
from conftest import REPO

from tokenizers_svc.formats import is_video_file
from tokenizers_svc.media import read_image, read_video
from training.config import load_recipe

EXAMPLES = REPO / "examples"
MAX_EXAMPLES_BYTES = 1_500_000
TINY_RECIPES = sorted((REPO / "training" / "recipes").glob("tiny-*.yaml"))


def _media() -> list:
    return sorted(p for p in EXAMPLES.rglob("*") if p.is_file() and p.name != "README.md")


def test_examples_are_small_readable_and_each_has_a_source_and_licence():
    files = _media()
    assert sum(p.stat().st_size for p in files) < MAX_EXAMPLES_BYTES
    listing = (EXAMPLES / "README.md").read_text()
    rows = {
        line.split("|")[1].strip().strip("`"): line for line in listing.splitlines() if line.startswith("| `")
    }
    assert set(rows) == {str(p.relative_to(EXAMPLES)) for p in files}
    for name, row in rows.items():
        source, licence = (cell.strip() for cell in row.strip("|").split("|")[2:4])
        assert source and ("CC0" in licence or "public domain" in licence), (name, licence)
    videos = [p for p in files if is_video_file(p)]
    assert len(videos) == 1 and len(read_video(videos[0]).frames) >= 17  # the video default's 1 + 4k
    assert all(read_image(p).ndim == 3 for p in files if p not in videos)


@pytest.mark.parametrize("recipe", TINY_RECIPES, ids=lambda p: p.stem)
def test_tiny_recipes_read_the_examples(recipe, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name paths relative to the repository root
    loaded = load_recipe(recipe)
    paths = [source.path for source in loaded.data.sources] + [loaded.validation.path]
    for path in paths:
        assert path.startswith("examples/") and (REPO / path).is_dir(), path
        assert any((REPO / path).iterdir()), path
