"""Resume checks, thread precedence and log-friendly progress of the trainer (issue 25, items 5, 6, 9)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import REPO
from training.checkpointing import recipe_differences
from training.train import cpu_threads, main

RECIPE = REPO / "training" / "recipes" / "tiny-image.yaml"


def test_recipe_differences_name_the_training_keys_only():
    saved = {"output_dir": "a", "optim": {"lr": 1e-3}, "phases": [{"steps": 100}], "data": {"num_workers": 0}}
    current = {
        "output_dir": "b",
        "optim": {"lr": 2e-3},
        "phases": [{"steps": 30}],
        "data": {"num_workers": 2},
    }
    assert recipe_differences(saved, current) == ["optim.lr: 0.001 -> 0.002", "phases.0.steps: 100 -> 30"]
    assert recipe_differences(saved, saved) == []


@pytest.mark.parametrize(
    ("recipe_threads", "environ", "threads", "note"),
    [
        (2, {}, 2, "the recipe's cpu_threads"),  # python -m training.train in a plain shell
        (2, {"OMP_NUM_THREADS": "1"}, None, "win over the recipe's cpu_threads: 2"),  # the command line wins
        (2, {"OMP_NUM_THREADS": "2"}, None, None),
        (None, {"OMP_NUM_THREADS": "1"}, None, None),
    ],
)
def test_command_line_threads_win_over_the_recipe(recipe_threads, environ, threads, note):
    got_threads, got_note = cpu_threads(recipe_threads, environ)
    assert got_threads == threads
    assert (got_note is None) if note is None else (note in got_note)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_resume_refuses_another_recipe_unless_forced(tmp_path, capsys, monkeypatch, one_thread):
    """A 4-step run on the examples, then --resume latest with another lr and step count: refused
    with the keys named and the export untouched; --force continues, saying so and that the export
    is replaced. Progress in a log (stderr is not a terminal here) is whole lines."""
    monkeypatch.chdir(REPO)  # the recipe reads examples/ relative to the repository root
    common = [
        "--recipe",
        str(RECIPE),
        f"output_dir={tmp_path}",
        "logging.tensorboard=false",
        "checkpoint.every=2",
    ]
    assert main([*common, "phases.0.steps=4"]) == 0
    first = capsys.readouterr().err
    assert "\r" not in first
    assert "train tiny-image: building sd-vae-tiny" in first.splitlines()[0]
    assert "train: 4/4 steps (100%)" in first and "loss=" in first
    export = (tmp_path / "export" / "diffusion_pytorch_model.safetensors").read_bytes()

    changed = [*common, "phases.0.steps=6", "optim.lr=1e-3", "--resume", "latest"]
    assert main(changed) == 1
    refused = capsys.readouterr().err
    assert "optim.lr: 0.002 -> 0.001" in refused and "phases.0.steps: 4 -> 6" in refused
    assert "--force" in refused
    assert (tmp_path / "export" / "diffusion_pytorch_model.safetensors").read_bytes() == export

    assert main([*changed, "--force"]) == 0
    forced = capsys.readouterr()
    assert "warning: --force: continuing" in forced.err and "optim.lr" in forced.err
    assert "holds the export of step 4; this run replaces it" in forced.err
    assert "replacing the export of step 4" in forced.out
    card = json.loads((tmp_path / "export" / "card.json").read_text())
    assert card["steps"] == 6 and card["training"]["resumed_from"].endswith("step_00000004")
