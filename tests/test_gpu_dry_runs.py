"""The two GPU scripts, run on CPU with --dry-run: same code paths, toy sizes (issues 11 and 16).

A GPU is lent for minutes at a time; these keep the scripts working between loans.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_check, gpu_defaults


@pytest.mark.slow
def test_gpu_defaults_dry_run_trains_evaluates_and_exports(shared_data, tmp_path):
    """One image candidate and the video recipe (every candidate's recipe is validated by
    test_training_config): concurrent probes, sized runs, scoring, the winner and its report."""
    candidate = gpu_defaults.IMAGE_CANDIDATES[-1]
    jobs = [candidate, gpu_defaults.VIDEO_RECIPE]
    argv = ["--dry-run", "--budget-s", "300", "--out", str(tmp_path), "--data", str(shared_data)]
    assert gpu_defaults.main([*argv, "--jobs", ",".join(jobs)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for recipe in jobs:
        item = results["plan"][recipe]
        assert item["exit_code"] == 0 and item["steps"] == 3 and item["seconds_per_step_probe"] > 0
        card = json.loads((tmp_path / recipe / "export" / "card.json").read_text())
        assert card["steps"] == 3 and card["recipe"]["phases"][0]["steps"] == 3  # the card replays the run
    assert set(results["images"]) == {candidate} and results["winner"] == candidate
    for scores in results["images"].values():
        assert scores["n"] == 8 and scores["floats_per_item"] == 3 * 256 * 256 // 48
    video = results["video"]
    assert video["n"] == 4 and len(video["mean_error_rgb"]) == 3
    assert "Winner" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_gpu_check_dry_run_measures_every_section_within_budget(tmp_path):
    assert (
        gpu_check.main(
            ["--dry-run", "--budget-s", "240", "--out", str(tmp_path), "--default-model", "sd-vae-tiny"]
        )
        == 0
    )
    results = json.loads((tmp_path / "results.json").read_text())
    sections = results["sections"]
    assert {"default model precision", "inference", "training", "largest untiled image (bf16)"} <= set(
        sections
    )
    assert "errors" not in sections
    ok = [row for row in sections["inference"] if row.get("status") == "ok"]
    assert {row["model"] for row in ok} == {
        "sd-vae-tiny",
        "dc-ae-f32c32-tiny",
        "vitok-tiny-8",
        "video-vae-tiny",
    }
    assert any("compile" in row["variant"] for row in ok)
    assert all(row["status"] == "ok" and row["samples_s"] > 0 for row in sections["training"])
    assert (tmp_path / "results.md").read_text().startswith("# GPU check on cpu")


def test_gpu_check_stops_inside_a_budget_that_is_already_spent(tmp_path):
    assert gpu_check.main(["--dry-run", "--budget-s", "5", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "results.json").exists()  # nothing started: every section needs more than 5 s
