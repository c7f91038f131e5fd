"""The sample media a clone has (issue 25, item 4): small, licensed, and what the tiny recipes read."""

from __future__ import annotations

import re

import pytest

from tests.helpers import REPO
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


def test_cli_says_what_it_loads_before_loading(tmp_path):
    """issue 25, item 5: a command that loads a model says so first (on stderr, stdout stays data)."""
    from typer.testing import CliRunner

    from tokenizers_svc.cli import app

    out = tmp_path / "cat.safetensors"
    result = CliRunner().invoke(
        app, ["encode", str(EXAMPLES / "images/train/cat.jpg"), "-o", str(out), "-m", "sd-vae-tiny"]
    )
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0] == "loading sd-vae-tiny (cpu, float32)"
    assert "loading" not in result.stdout


# What a clone does not have: the project's data folder and made-up file names.
NOT_IN_A_CLONE = re.compile(
    r"\.\./shared/data|photo\.jpg|clip\.mp4|/data/photos|/data/clips|cat\.png|path/to/"
)


def test_doc_examples_use_files_a_clone_has():
    """Code blocks in README.md and docs/*.md name examples/ (or a cluster's own paths), never the
    project's ../shared/data or placeholder files a reader does not have."""
    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        inside = False
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if line.startswith("```"):
                inside = not inside
            elif inside and NOT_IN_A_CLONE.search(line):
                found.append(f"{page.name}:{number}: {line.strip()}")
    assert found == []
