"""The Ray Data batch job on local Ray: real photos, a real clip and corrupt files all accounted for,
latents equal to in-process encoding, resume after a SIGKILL without duplicates or gaps.

One local Ray per module (2 CPUs), reused when another module already started one (as
tests/test_serving.py does), so both can run in one pytest session in either order.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from typer.testing import CliRunner

from serving import batch
from serving.batch.driver import _check_job
from tests.helpers import own_ray_processes
from tokenizers_svc.cli import app
from tokenizers_svc.datasets import BucketBatchSampler, LatentDataset, TokenDataset
from tokenizers_svc.errors import ConfigError
from tokenizers_svc.latents import latents_from_bytes
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.pipeline import EncodeOptions, MediaInput, encode_media, load_media
from tokenizers_svc.pixels import MODEL_INPUT_RESIZE
from tokenizers_svc.registry import get_preset, list_presets
from tokenizers_svc.tokens import tokens_from_bytes

# the whole module runs its jobs on a local Ray (tests/conftest.py): `make test-fast` skips it
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]

REPO = Path(__file__).resolve().parents[1]
IMAGE_MODEL = "sd-vae-tiny"
VIDEO_MODEL = "video-vae-tiny"
HAS_VIDEO = VIDEO_MODEL in {p.name for p in list_presets()}
# 640x480 twice (board, stuff): same size after the resize, so they share one encoder call.
PHOTOS = ("board.jpg", "stuff.jpg", "chelsea.jpg", "plant.jpg", "chicky_512.jpg")
CLIP = "carphone_pristine.mp4"  # real footage (MANIFEST.json), 176x144 at 29.97 fps
RESIZE = ["--resize", "shorter-side", "--resolution", "64"]
OPTIONS = EncodeOptions(resize="shorter-side", resolution=64)
BAD_NAME = b"bad\xff\xfename.jpg"  # not UTF-8


@pytest.fixture
def no_ray(monkeypatch):
    """The job must finish (or refuse) without starting Ray: as if none were running, and starting
    one fails the test."""

    def start(**_):
        raise AssertionError("the job started Ray")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr("serving.batch.driver.init_ray", start)


def _corrupt_files(folder: Path, photo: Path) -> dict[str, str]:
    """Broken inputs -> the error type each must produce."""
    (folder / "truncated.jpg").write_bytes(photo.read_bytes()[:4000])
    (folder / "garbage.png").write_bytes(b"this is not a png at all" * 10)
    (folder / "empty.mp4").write_bytes(b"")
    return {"truncated.jpg": "invalid_media", "garbage.png": "invalid_media", "empty.mp4": "invalid_media"}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, shared_data) -> tuple[Path, dict[str, str]]:
    """Photos (one in a subfolder), a clip, corrupt files and a non-media file -> expected errors."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "nested").mkdir()
    for i, name in enumerate(PHOTOS):
        shutil.copy(shared_data / "images" / "val" / name, folder / ("nested" if i == 0 else ".") / name)
    shutil.copy(shared_data / "videos" / CLIP, folder / CLIP)
    (folder / "notes.txt").write_text("not media, ignored")
    # issue 13 cases 5 and 7: a name that is not UTF-8 is encoded; a symlink loop and a directory
    # with a media suffix are listed as ignored, with the reason
    shutil.copy(shared_data / "images" / "val" / PHOTOS[1], os.fsencode(folder) + b"/" + BAD_NAME)
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    (folder / "x.jpg").mkdir()
    errors = _corrupt_files(folder, shared_data / "images" / "val" / PHOTOS[0])
    errors[CLIP] = "invalid_request"  # an image-only model refuses videos, as a row, not a crash
    return folder, errors


def _rows(output: Path) -> list[dict]:
    return pa.concat_tables(pq.read_table(p) for p in batch.shard_paths(output)).to_pylist()


def _run(argv: list[str]) -> int:
    return batch.main([str(a) for a in argv])


@contextlib.contextmanager
def _encoder_actor_environments(into: list[dict[str, str]]) -> Iterator[None]:
    """While the block runs, the environment of each encoder actor process this test process's Ray
    starts, polled in a thread; added to ``into`` at the end."""
    found: dict[int, dict[str, str]] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.2):
            for process in own_ray_processes("EncodeWorker"):
                with contextlib.suppress(psutil.Error):
                    if process.pid not in found:
                        found[process.pid] = process.environ()

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        into += found.values()


@pytest.fixture(scope="module")
def encoder_environments() -> list[dict[str, str]]:
    """Filled by :func:`image_job` with its encoder actors' environments."""
    return []


@pytest.fixture(scope="module")
def image_job(image_folder, tmp_path_factory, encoder_environments) -> tuple[Path, Path, dict[str, str]]:
    folder, errors = image_folder
    out = tmp_path_factory.mktemp("image_job")
    argv = ["--input", folder, "--output", out, "--model", IMAGE_MODEL, *RESIZE, "--batch-size", "4"]
    # --workers 2 on 2 CPUs: the README command, which used to leave no CPU for the read tasks (hang)
    with _encoder_actor_environments(encoder_environments):
        assert _run([*argv, "--shard-rows", "3", "--workers", "2"]) == 0
    return folder, out, errors


def test_encoder_actors_allocate_from_one_heap(image_job, encoder_environments):
    """Ray Data calls the encoder in a thread of the actor's own: the actors start with glibc's one
    malloc arena (tokenizers_svc.memory.model_process_environment), as a served model's replica."""
    assert len(encoder_environments) == 2  # --workers 2
    assert all(env.get("MALLOC_ARENA_MAX") == "1" for env in encoder_environments)


def test_every_input_accounted_for(image_job):
    folder, out, errors = image_job
    rows = _rows(out)
    by_name = {Path(os.fsdecode(r["source_path_bytes"])).name: r for r in rows}
    assert len(rows) == len(by_name) == len(PHOTOS) + 1 + len(errors)  # exactly one row per input
    bad = by_name.pop(os.fsdecode(BAD_NAME))
    assert bad["error"] is None and bad["source_path"].endswith("bad\ufffd\ufffdname.jpg")
    assert len({r["id"] for r in rows}) == len(rows)
    for name, error_type in errors.items():
        row = by_name[name]
        assert row["error"].startswith(f"{error_type}: "), row["error"]
        assert row["latents"] is None and row["shape"] is None
    assert by_name[CLIP]["kind"] == "video" and "images only" in by_name[CLIP]["error"]
    for name in PHOTOS:
        assert by_name[name]["error"] is None and by_name[name]["kind"] == "image"
    assert by_name[PHOTOS[0]]["source_path"] == str((folder / "nested" / PHOTOS[0]).resolve())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["missing"] == []
    assert manifest["inputs"]["count"] == len(rows)
    folder = folder.resolve()
    assert manifest["inputs"]["ignored"] == [
        {"path": str(folder / "loop.jpg"), "reason": "cannot stat: Too many levels of symbolic links"},
        {"path": str(folder / "notes.txt"), "reason": "not a media file suffix"},
        {"path": str(folder / "x.jpg"), "reason": "a directory with a media suffix"},
    ]
    listing = pq.read_table(out / manifest["inputs"]["listing"]).column("path_bytes").to_pylist()
    assert listing == sorted(r["source_path_bytes"] for r in rows)
    assert manifest["outputs"]["rows"] == len(rows) and manifest["outputs"]["duplicate_rows"] == 0
    assert manifest["run"]["rows_ok"] == len(PHOTOS) + 1 and manifest["run"]["rows_error"] == len(errors)
    # the driver encoded the head of the inputs while the 2 actors started: one batch (--batch-size
    # 4) at most, and no more than a third worker's share; the rows above count those exactly once
    assert manifest["run"]["head_start_inputs"] == min(4, len(rows) // 3) > 0
    assert manifest["run"]["bytes_written"] == sum(p.stat().st_size for p in batch.shard_paths(out))
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in batch.shard_paths(out)]
    assert max(sizes) <= 3 and len(sizes) == len(manifest["outputs"]["shards"])  # --shard-rows 3
    assert "serving.batch" in manifest["command"] and "--shard-rows 3" in manifest["command"]


def test_latents_equal_in_process_encoding(image_job):
    _, out, _ = image_job
    tokenizer = load_tokenizer(IMAGE_MODEL)
    for row in _rows(out):
        if row["error"] is not None:
            continue
        data = Path(os.fsdecode(row["source_path_bytes"])).read_bytes()
        expected = encode_media(tokenizer, load_media(data, options=OPTIONS), OPTIONS)
        got = latents_from_bytes(row["latents"])
        torch.testing.assert_close(got.latents, expected.latents)
        assert row["shape"] == list(expected.latents.shape) and row["dtype"] == "float32"
        assert got.original_size == expected.original_size and got.padding == expected.padding
        assert got.resized_from == expected.resized_from == (row["original_height"], row["original_width"])
        assert got.source_sha256 == row["sha256"] == expected.source_sha256
        assert got.weights_hash == row["weights_hash"] == tokenizer.weights_hash
        assert got.normalized and row["normalized"]
        assert json.loads(row["normalization"]) == tokenizer.spec.normalization.to_dict()


def test_the_driver_engine_writes_the_rows_the_ray_job_wrote(image_job, tmp_path, no_ray, capsys):
    """--engine driver, on the same inputs (a clip, corrupt files, a name that is not UTF-8): no
    Ray, one thread per core, and row for row what the actors wrote: same ids, errors, latents."""
    folder, ray_out, _ = image_job
    out = tmp_path / "driver"
    argv = ["--input", folder, "--output", out, "--model", IMAGE_MODEL, *RESIZE, "--batch-size", "2"]
    assert _run([*argv, "--engine", "driver"]) == 0
    assert "in this process: " in capsys.readouterr().err
    by_id = {row["id"]: row for row in _rows(ray_out)}
    rows = _rows(out)
    assert sorted(row["id"] for row in rows) == sorted(by_id)  # exactly one row per input, the same ids
    for row in rows:
        expected = by_id[row["id"]]
        assert row["error"] == expected["error"] and row["encoder_node"] is None
        if row["error"] is None:
            got, want = latents_from_bytes(row["latents"]), latents_from_bytes(expected["latents"])
            torch.testing.assert_close(got.latents, want.latents)
    run = json.loads((out / "manifest.json").read_text())["run"]
    assert run["size"]["engine"] == "driver" and run["size"]["workers"] == 0
    assert run["size"]["driver_threads"] == min(len(os.sched_getaffinity(0)), 8)
    assert _run([*argv, "--engine", "driver", "--workers", "2"]) == 1
    assert "--engine driver runs no encoder actors, but --workers sizes them" in capsys.readouterr().err


def test_the_driver_engine_encodes_in_the_asked_dtype(shared_data, tmp_path, no_ray):
    """--engine driver --dtype bfloat16: the driver's float32 copy (loaded to plan and measure) is
    not the model that encodes; rows equal an in-process bfloat16 encode. The shipped default: its
    weights hash is its files', the same in any dtype."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(shared_data / "images" / "val" / PHOTOS[2], folder / PHOTOS[2])
    out = tmp_path / "out"
    argv = ["--input", folder, "--output", out, "--model", "tsvc-image-f8c4", *RESIZE, "--engine", "driver"]
    assert _run([*argv, "--dtype", "bfloat16"]) == 0
    (row,) = _rows(out)
    tokenizer = load_tokenizer("tsvc-image-f8c4", dtype=torch.bfloat16)
    data = (folder / PHOTOS[2]).read_bytes()
    expected = encode_media(tokenizer, load_media(data, options=OPTIONS), OPTIONS)
    torch.testing.assert_close(latents_from_bytes(row["latents"]).latents, expected.latents)
    assert json.loads((out / "job.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("cores", [2, 16])
def test_an_image_job_on_this_machine_runs_in_the_driver(shared_data, tmp_path, no_ray, monkeypatch, cores):
    """No cluster named, images only: Ray is never started and a corrupt file is still its one
    error row. With a driver thread for every core (this machine) whatever the job's length; on 16
    cores, more than the driver's threads (a machine that cannot exist here, so its core count is
    set), only because the job is short: the driver measures the first inputs and keeps their rows."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("serving.batch.driver._machine_cores", lambda: cores)
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS:
        shutil.copy(shared_data / "images" / "val" / name, folder / name)
    (folder / "truncated.jpg").write_bytes((folder / PHOTOS[0]).read_bytes()[:4000])
    out = tmp_path / "out"
    assert _run(["--input", folder, "--output", out, "--model", IMAGE_MODEL, *RESIZE]) == 0
    rows = _rows(out)
    by_name = {Path(row["source_path"]).name: row for row in rows}
    assert len(rows) == len(by_name) == len(PHOTOS) + 1
    assert by_name.pop("truncated.jpg")["error"].startswith("invalid_media: ")
    assert all(row["error"] is None and row["latents"] is not None for row in by_name.values())
    run = json.loads((out / "manifest.json").read_text())["run"]
    assert run["size"]["engine"] == "driver" and run["head_start_inputs"] == 0
    assert run["size"]["driver_threads"] == min(cores, 8)
    if cores == 2:
        assert run["size"]["why"].startswith("this machine alone, 2 cores: a driver thread for each")
    else:
        assert "would cost more than 5% of the job" in run["size"]["why"]


def test_rerun_skips_everything(image_job, no_ray, capsys):
    """Everything done: checked and answered on this machine, without Ray (issue 25)."""
    folder, out, _ = image_job
    before = sorted(p.name for p in batch.shard_paths(out))
    argv = ["--input", folder, "--output", out, "--model", IMAGE_MODEL, *RESIZE, "--batch-size", "4"]
    assert _run(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in batch.shard_paths(out)) == before
    assert manifest["run"]["inputs_skipped"] == manifest["inputs"]["count"]
    assert manifest["run"]["inputs_encoded"] == 0 and len(manifest["runs"]) == 2
    count = manifest["inputs"]["count"]
    assert f"nothing to do: all {count} inputs already done" in capsys.readouterr().out


def test_rerun_with_other_options_is_refused(image_job, no_ray, capsys):
    folder, out, _ = image_job
    argv = [
        "--input",
        folder,
        "--output",
        out,
        "--model",
        IMAGE_MODEL,
        "--resize",
        "fit",
        "--resolution",
        "64",
    ]
    assert _run(argv) == 1
    assert "different options" in capsys.readouterr().err


def test_rerun_by_a_version_that_resizes_otherwise_is_refused(image_job, tmp_path, no_ray, capsys):
    """A resized job pins how inputs are resized: the same command, run by a version whose resize
    gives other pixels (or one from before the name, which did not write it), refuses the directory
    rather than mixing latents of two kinds of pixels in it, and leaves its rows as they were."""
    folder, out, _ = image_job
    assert json.loads((out / batch.JOB_FILE).read_text())["model_input_resize"] == MODEL_INPUT_RESIZE
    for earlier, says in (("float-bicubic-v0", "resized inputs by float-bicubic-v0"), (None, "did not name")):
        copy = tmp_path / f"written-by-{earlier}"
        shutil.copytree(out, copy)
        job = json.loads((copy / batch.JOB_FILE).read_text())
        job.pop("model_input_resize")
        if earlier is not None:
            job["model_input_resize"] = earlier
        (copy / batch.JOB_FILE).write_text(json.dumps(job))
        shards = {p.name: p.read_bytes() for p in batch.shard_paths(copy)}
        argv = ["--input", folder, "--output", copy, "--model", IMAGE_MODEL, *RESIZE, "--batch-size", "4"]
        assert _run(argv) == 1
        err = capsys.readouterr().err
        assert says in err and f"this one resizes by {MODEL_INPUT_RESIZE}" in err, err
        assert "use a new --output" in err
        assert {p.name: p.read_bytes() for p in batch.shard_paths(copy)} == shards


def test_which_refusal_a_changed_job_gets(tmp_path):
    """A crop job written before the resize had a name (its options then held the crop's resolution)
    gets the version's refusal, as a resize job does; a job that did not resize, rerun with a resize,
    is a change of options, not of version."""
    options = {"resize": "none", "resolution": None}
    crop = {"mode": "center", "sizes": [[64, 64]]}
    now_cropping = {"model": "m", "options": options, "crop": crop, "model_input_resize": MODEL_INPUT_RESIZE}
    old_crop = {"model": "m", "options": {**options, "resolution": 64}, "crop": crop}
    with pytest.raises(ConfigError, match="did not name its input resize"):
        _check_job(tmp_path, SimpleNamespace(key=lambda: now_cropping), old_crop)
    now_resizing = {
        "model": "m",
        "options": {"resize": "fit", "resolution": 64},
        "model_input_resize": MODEL_INPUT_RESIZE,
    }
    with pytest.raises(ConfigError, match="holds a job with different model_input_resize, options; rerun"):
        _check_job(tmp_path, SimpleNamespace(key=lambda: now_resizing), {"model": "m", "options": options})


def test_output_that_is_a_file_is_refused_before_ray(image_folder, tmp_path, no_ray, capsys):
    """An existing file, or a path under one, as --output: one config_error line (issue 27)."""
    folder, _ = image_folder
    existing = tmp_path / "latents.parquet"
    existing.write_bytes(b"not a directory")
    for output, expected in (
        (
            existing,
            f"--output {existing} is an existing file; expected a directory (new, or a batch-encode output to resume)",
        ),
        (existing / "sub", f"--output {existing / 'sub'} is under {existing}, which is a file"),
    ):
        assert _run(["--input", folder, "--output", output, "--model", IMAGE_MODEL]) == 1
        err = capsys.readouterr().err
        assert err.splitlines() == [f"error: config_error: {expected}"], err
    assert existing.read_bytes() == b"not a directory"


def test_cli_batch_encode_delegates(image_job):
    folder, out, _ = image_job
    argv = ["batch-encode", "--input", str(folder), "--output", str(out), "--model", IMAGE_MODEL, *RESIZE]
    result = CliRunner().invoke(app, [*argv, "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "complete" in result.stdout and f"{len(_rows(out))} rows in" in result.stdout


def test_bad_arguments_are_config_errors(image_folder, tmp_path, capsys):
    folder, _ = image_folder
    assert (
        _run(["--input", tmp_path / "nothing-*.png", "--output", tmp_path / "o", "--model", IMAGE_MODEL]) == 1
    )
    assert "matched no media files" in capsys.readouterr().err
    assert (
        _run(["--input", folder, "--output", tmp_path / "o", "--model", IMAGE_MODEL, "--resize", "fit"]) == 1
    )
    assert "needs --resolution" in capsys.readouterr().err
    base = ["--input", folder, "--output", tmp_path / "o", "--model", IMAGE_MODEL]
    assert _run([*base, "--crop", "center"]) == 1
    assert "--crop center needs --resolution and no --resize" in capsys.readouterr().err
    assert _run([*base, *RESIZE, "--crop", "random"]) == 1
    assert "--crop random needs --resolution and no --resize" in capsys.readouterr().err
    assert _run([*base, "--resolution", "64", "--aspect-buckets"]) == 1
    assert "--aspect-buckets needs --crop" in capsys.readouterr().err
    assert _run([*base, "--resolution", "64"]) == 1  # used to encode every input at its own size
    assert "--resolution needs --resize shorter-side|fit or --crop center|random" in capsys.readouterr().err
    assert _run(["--input", folder, "--output", tmp_path / "o", "--model", "no-such-model"]) == 1
    assert "unsupported_model" in capsys.readouterr().err


@pytest.mark.slow  # Ray retries for about 20 s before it gives up
def test_cluster_with_token_auth_refuses_a_client_without_it_clearly(image_folder, tmp_path):
    """This test's Ray uses token authentication (Ray's default); a job pointed at its address with
    token mode off (as when RAY_ADDRESS is exported without RAY_AUTH_MODE=token) is refused, and says
    what to export instead of printing Ray's traceback."""
    folder, _ = image_folder
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    argv = ["--input", folder, "--output", tmp_path / "out", "--model", IMAGE_MODEL]
    job = subprocess.run(
        [sys.executable, "-m", "serving.batch", *map(str, argv)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert job.returncode == 1, job.stderr
    last = job.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: config_error: the Ray cluster refused this client")
        and "InvalidAuthToken" in last
    )
    assert "export RAY_AUTH_MODE=token" in last and "Traceback" not in job.stderr


def test_manifest_input_with_missing_file_limit_and_added_file(image_folder, tmp_path, capsys):
    """A Parquet manifest (paths relative to it) naming a missing file; --limit stops after N
    pending inputs; the rerun encodes exactly the rest plus a file added to the listing since. The
    driver reports rows done of the pending total with a rate (a plain line: stderr is no terminal)."""
    folder, _ = image_folder
    relative = Path(os.path.relpath(folder, tmp_path))
    paths = [str(relative / name) for name in PHOTOS[1:3]] + ["gone.jpg"]
    # an empty row and a repeated one are ignored, each with its reason in the manifest (issue 27)
    pq.write_table(pa.table({"path": [*paths, "", str(relative / PHOTOS[1])]}), tmp_path / "list.parquet")
    out = tmp_path / "out"
    argv = ["--input", tmp_path / "list.parquet", "--output", out, "--model", IMAGE_MODEL, *RESIZE]
    argv += ["--workers", "1"]  # a few inputs: a second actor's start-up would cost more than it encodes
    assert _run([*argv, "--limit", "2"]) == 0
    assert re.search(r"^batch-encode: 2/2 rows \(100%\), [\d.]+ row/s", capsys.readouterr().err, re.M)
    first = json.loads((out / "manifest.json").read_text())
    assert not first["complete"] and len(first["missing"]) == 1 and len(_rows(out)) == 2
    assert first["inputs"]["count"] == 3 and first["inputs"]["ignored"] == [
        {"path": "", "reason": "empty path in row 3 of list.parquet"},
        {
            "path": str((folder / PHOTOS[1]).resolve()),
            "reason": "duplicate: row 4 of list.parquet repeats row 0",
        },
    ]

    paths.append(str(relative / PHOTOS[3]))
    pq.write_table(pa.table({"path": paths}), tmp_path / "list.parquet")
    assert _run(argv) == 0
    rows = _rows(out)
    assert sorted(Path(r["source_path"]).name for r in rows) == sorted([*PHOTOS[1:4], "gone.jpg"])
    missing = next(r for r in rows if r["source_path"].endswith("gone.jpg"))
    assert missing["error"].startswith("invalid_media: cannot read gone.jpg") and missing["sha256"] is None
    second = json.loads((out / "manifest.json").read_text())
    assert second["complete"] and second["run"]["inputs_skipped"] == 2
    assert second["run"]["rows_ok"] == 1 and second["run"]["rows_error"] == 1


@pytest.mark.slow
def test_one_bad_input_of_each_kind_costs_only_its_row(shared_data, tmp_path, capsys, monkeypatch):
    """Issue 27: a 1x1 image (it made the tiny VAE's GroupNorm raise and killed the job on every
    rerun; it is now padded up to the model's minimum and cropped back), a truncated file and a
    zero-byte file among 30 photos, with the job's own defaults: every input exactly one row, the
    photos and the 1x1 image ok, and a rerun encodes nothing again."""
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    photos = sorted((shared_data / "images" / "train").iterdir())[:30]
    for photo in photos:  # the real photos, made small so that the test stays quick
        with Image.open(photo) as image:
            image.convert("RGB").resize((64, 48)).save(folder / f"{photo.stem}.jpg", quality=90)
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "tiny.png")
    (folder / "truncated.jpg").write_bytes(photos[0].read_bytes()[:3000])
    (folder / "zero.jpg").write_bytes(b"")
    out = tmp_path / "out"
    argv = ["--input", folder, "--output", out, "--model", IMAGE_MODEL, "--workers", "1"]
    assert _run(argv) == 0
    rows = {Path(r["source_path"]).name: r for r in _rows(out)}
    assert len(rows) == len(_rows(out)) == 33
    assert sorted(name for name, row in rows.items() if row["error"] is None) == sorted(
        [f"{photo.stem}.jpg" for photo in photos] + ["tiny.png"]
    )
    assert latents_from_bytes(rows["tiny.png"]["latents"]).original_size == (1, 1)
    assert rows["truncated.jpg"]["error"].startswith("invalid_media: ")
    assert rows["zero.jpg"]["error"].startswith("invalid_media: ")
    capsys.readouterr()

    shards = sorted(p.name for p in batch.shard_paths(out))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the rerun needs no Ray
    monkeypatch.setattr("serving.batch.driver.init_ray", lambda **_: pytest.fail("the rerun started Ray"))
    assert _run(argv) == 0
    assert "nothing to do: all 33 inputs already done" in capsys.readouterr().out
    assert sorted(p.name for p in batch.shard_paths(out)) == shards


def _killed_at_first_shard(argv: list, out: Path) -> set[str]:
    """Run ``python -m serving.batch ARGV`` and SIGKILL it as soon as its first shard is in ``out``
    -> the shards it left."""
    job = subprocess.Popen(
        [sys.executable, "-m", "serving.batch", *map(str, argv)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not batch.shard_paths(out) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    return {p.name for p in batch.shard_paths(out)}


@pytest.mark.slow
def test_resume_after_sigkill_no_duplicates_no_gaps(image_folder, tmp_path):
    """SIGKILL the job's driver (a separate process on this test's Ray, as on a cluster) as soon as
    its first shard is on disk, leave a half-written shard behind, rerun at once: every input
    exactly once, although the killed run's last tasks may still be finishing."""
    folder, errors = image_folder
    out = tmp_path / "out"
    argv = ["--input", folder, "--output", out, "--model", IMAGE_MODEL, *RESIZE, "--shard-rows", "1"]
    address = ray.get_runtime_context().gcs_address
    first = _killed_at_first_shard([*argv, "--batch-size", "1", "--address", address], out)
    total = len(PHOTOS) + 1 + len(errors)  # + the file whose name is not UTF-8
    assert 0 < len(first) < total, "the job must be killed midway"
    assert not (out / "manifest.json").exists()
    (out / ".part-interrupted.parquet.tmp").write_bytes(b"PAR1 half a shard")

    assert _run(argv) == 0
    rows = _rows(out)
    assert {p.name for p in batch.shard_paths(out)} >= first  # nothing written before is rewritten
    names = sorted(Path(os.fsdecode(r["source_path_bytes"])).name for r in rows)
    assert names == sorted([*PHOTOS, os.fsdecode(BAD_NAME), *errors])
    assert len({r["id"] for r in rows}) == len(rows) == total
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["outputs"]["duplicate_rows"] == 0
    assert manifest["run"]["inputs_skipped"] + manifest["run"]["inputs_encoded"] == total
    assert not list(out.glob(".part-*.tmp"))


def test_a_killed_driver_engine_run_resumes_exactly_once(shared_data, tmp_path, no_ray):
    """The job run in its driver (no Ray) is SIGKILLed once its first shard is on disk, with its
    threads' batches in flight; the rerun encodes the rest: every input exactly once."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(40):  # ~1 s of work on two threads: the kill lands midway
        name = PHOTOS[i % len(PHOTOS)]
        shutil.copy(shared_data / "images" / "val" / name, folder / f"{i:02d}-{name}")
    out = tmp_path / "out"
    argv = ["--input", folder, "--output", out, "--model", IMAGE_MODEL, *RESIZE, "--engine", "driver"]
    first = _killed_at_first_shard([*argv, "--batch-size", "1", "--shard-rows", "1"], out)
    assert 0 < len(first) < 40, "the job must be killed midway"

    assert _run(argv) == 0
    rows = _rows(out)
    assert {p.name for p in batch.shard_paths(out)} >= first
    assert sorted(Path(r["source_path"]).name for r in rows) == sorted(p.name for p in folder.iterdir())
    assert all(r["error"] is None for r in rows) and len({r["id"] for r in rows}) == 40
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["outputs"]["duplicate_rows"] == 0
    assert manifest["run"]["inputs_skipped"] == len(first) and manifest["run"]["size"]["engine"] == "driver"


def test_writer_of_an_earlier_run_discards_its_shard(tmp_path):
    """The fence that keeps the writer of a run that lost the directory to a later run of the same
    command from adding rows the later run also writes."""
    (tmp_path / batch.RUN_FILE).write_text("current-run")
    row = dict.fromkeys(batch.ROW_SCHEMA.names) | {
        "id": "x",
        "source_path": "/a.png",
        "error": "invalid_media: x",
    }
    table = pa.Table.from_pylist([row], schema=batch.ROW_SCHEMA)
    stale = batch.write_shard(table, output=str(tmp_path), run_id="killed-run")
    assert stale == {"shard": "", "ok": 0, "errors": 0, "bytes": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == [batch.RUN_FILE]
    summary = batch.write_shard(table, output=str(tmp_path), run_id="current-run")
    assert summary["errors"] == 1 and [p.name for p in batch.shard_paths(tmp_path)] == [summary["shard"]]
    assert pq.read_table(tmp_path / summary["shard"]).to_pylist() == [row]


@pytest.mark.skipif(not HAS_VIDEO, reason=f"{VIDEO_MODEL} is not registered")
def test_video_clips_follow_frame_rule_and_equal_in_process(shared_data, tmp_path):
    """A real clip cut into 9-frame windows (1 + 4k) plus a photo (a one-frame clip) with the tiny
    LTX-Video preset; each clip row equals encoding its frames in process."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(shared_data / "videos" / CLIP, folder / CLIP)
    shutil.copy(shared_data / "images" / "val" / "chelsea.jpg", folder / "chelsea.jpg")
    out = tmp_path / "out"
    argv = ["--input", folder, "--output", out, "--model", VIDEO_MODEL, "--max-frames", "20"]
    argv += ["--workers", "1"]  # one actor: one clip and one photo
    assert _run([*argv, "--clip-frames", "8"]) == 1  # 8 is not 1 + 4k
    assert _run([*argv, "--clip-frames", "9", *RESIZE]) == 0
    rows = sorted(_rows(out), key=lambda r: (r["source_path"], r["clip_index"] or 0))
    clips = [r for r in rows if r["kind"] == "video"]
    assert [(r["clip_start_frame"], r["clip_end_frame"]) for r in clips] == [(0, 9), (9, 18), (18, 20)]
    assert all(r["clip_count"] == 3 and r["original_frames"] == 20 and r["error"] is None for r in clips)
    fps = clips[0]["fps"]
    assert fps == pytest.approx(30000 / 1001)
    assert [(r["clip_start"], r["clip_end"]) for r in clips] == [
        (pytest.approx(s / fps), pytest.approx(e / fps)) for s, e in ((0, 9), (9, 18), (18, 20))
    ]
    tokenizer = load_tokenizer(VIDEO_MODEL)
    options = EncodeOptions(resize="shorter-side", resolution=64, max_frames=20)
    video = load_media((folder / CLIP).read_bytes(), options=options)
    for row in clips:
        s, e = row["clip_start_frame"], row["clip_end_frame"]
        clip = MediaInput(video.pixels[:, :, s:e], "video", video.fps, video.sha256, video.original_size)
        expected = encode_media(tokenizer, clip, options)
        got = latents_from_bytes(row["latents"])
        torch.testing.assert_close(got.latents, expected.latents)
        assert got.original_frames == e - s and got.fps == pytest.approx(fps)
        assert float(got.extra["clip_start"]) == pytest.approx(row["clip_start"])
    photo = next(r for r in rows if r["kind"] == "image")
    assert photo["error"] is None and len(photo["shape"]) == 5  # (1, C, 1, h, w): a one-frame clip

    # Read back: the short last clip decodes to its own 2 frames at the resized size.
    dataset = LatentDataset(out)
    last = next(i for i in range(len(dataset)) if dataset.metadata(i)["clip_index"] == 2)
    assert dataset[last]["latents"].ndim == 4  # (C, t, h, w)
    assert dataset.decode(last, tokenizer).shape == (1, 3, 2, 64, 78)  # 176x144 -> shorter side 64

    # Resume of a partly written video: with clips 0 and 2 on disk, only clip 1 is prepared again,
    # under the same id as before.
    plan = batch.make_plan(
        batch.build_parser().parse_args([str(a) for a in [*argv, "--clip-frames", "9", *RESIZE]]), "cpu"
    )
    done = [clips[0]["id"], clips[2]["id"]]
    (again,) = batch.prepare_row({"path": clips[1]["source_path"], "done_ids": done}, plan=plan)
    assert again["id"] == clips[1]["id"] and again["clip_index"] == 1 and again["pixels"] is not None


def test_encoder_batches_same_shape_rows_and_isolates_a_bad_one(image_folder):
    """The actor class in process, fed by decode tasks (Arrow pixels, read without a copy): same-size
    photos share one model call; a NaN item in their group fails the call, then the group is
    retried item by item and only that item errors."""
    folder, _ = image_folder
    plan = batch.make_plan(
        batch.build_parser().parse_args(["--input", "x", "--output", "y", "--model", IMAGE_MODEL, *RESIZE]),
        "cpu",
    )
    paths = [
        folder / "nested" / PHOTOS[0],
        folder / PHOTOS[1],
        folder / PHOTOS[2],
    ]  # 640x480, 640x480, 451x300
    board, stuff, chelsea = (batch.prepare_input(str(p), plan, plan.key())[0] for p in paths)
    nan = board | {"id": "nan", "pixels": torch.full(board["pixels"].shape, float("nan"))}  # float32 too
    threads = torch.get_num_threads()
    worker = batch.EncodeWorker(plan, num_threads=1)  # sets this process's torch threads, as in an actor
    torch.set_num_threads(threads)  # later tests (pinned metric values) must not inherit 1 thread
    calls = []
    encode = worker.tokenizer.encode
    worker.tokenizer.encode = lambda pixels, **kw: calls.append(pixels.shape[0]) or encode(pixels, **kw)
    out = worker(batch.prepared_table([board, stuff, nan, chelsea])).to_pylist()
    assert calls == [3, 1, 1, 1, 1]
    assert [r["error"] is None for r in out] == [True, True, False, True]
    assert out[2]["error"].startswith("invalid_request: ") and "NaN" in out[2]["error"]
    tokenizer = load_tokenizer(IMAGE_MODEL)
    for path, row in zip([paths[0], paths[1], None, paths[2]], out, strict=True):
        if path is not None:
            expected = encode_media(tokenizer, load_media(path.read_bytes(), options=OPTIONS), OPTIONS)
            torch.testing.assert_close(latents_from_bytes(row["latents"]).latents, expected.latents)


def test_pixels_leave_the_cpu_stage_resized_as_uint8(image_folder):
    """With --resize the CPU stage ships the resized pixels, uint8 (a photo of 451x300 becomes
    96x64: a 22nd of its decoded bytes, an 88th of them as float32), and records the decoded size."""
    folder, _ = image_folder
    plan = batch.make_plan(
        batch.build_parser().parse_args(["--input", "x", "--output", "y", "--model", IMAGE_MODEL, *RESIZE]),
        "cpu",
    )
    (row,) = batch.prepared_table(batch.prepare_input(str(folder / PHOTOS[2]), plan, plan.key())).to_pylist()
    assert row["pixel_dtype"] == "uint8" and row["pixel_shape"] == [1, 3, 64, 96]
    assert len(row["pixels"]) == 3 * 64 * 96
    assert (row["original_height"], row["original_width"]) == (300, 451)


def test_token_job_writes_int32_id_columns_and_an_autoregressive_dataset_reads_them(image_folder, tmp_path):
    """--tokens with a quantized model: ids as an int32 column (and the token file), the vocabulary
    in the manifest; TokenDataset batches same-shape ids for an autoregressive trainer."""
    from dataclasses import replace

    import yaml
    from torch.utils.data import DataLoader

    from tokenizers_svc.loading import build_module

    folder, _ = image_folder
    recipe = yaml.safe_load((REPO / "training" / "recipes" / "tiny-fsq.yaml").read_text())["model"]
    preset = get_preset(recipe["preset"])
    model = tmp_path / "tiny-fsq"
    build_module(replace(preset, config={**preset.config, **recipe["config"]})).save_pretrained(model)
    out = tmp_path / "tokens"
    argv = ["--input", folder, "--output", out, "--model", model, *RESIZE, "--tokens", "--workers", "1"]
    assert _run(argv) == 0  # the clip and the corrupt files are error rows, as for latents
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokens"]["vocabulary_size"] == 1000 and manifest["tokens"]["id_dtype"] == "int32"
    tokenizer = load_tokenizer(model)
    options = replace(OPTIONS, tokens=True)
    rows = [row for row in _rows(out) if row["error"] is None]
    assert len(rows) == len(PHOTOS) + 1  # the photos and the one with a non-UTF-8 name
    for row in rows:
        data = Path(os.fsdecode(row["source_path_bytes"])).read_bytes()
        expected = encode_media(tokenizer, load_media(data, options=options), options)
        assert row["dtype"] == "int32" and row["shape"] == list(expected.ids.shape)
        assert row["ids"] == expected.ids.flatten().tolist()
        assert torch.equal(tokens_from_bytes(row["latents"]).ids, expected.ids)
    dataset = TokenDataset(out)
    assert len(dataset) == len(rows) and dataset.vocabulary_size == 1000
    loader = DataLoader(
        dataset, batch_sampler=BucketBatchSampler(dataset, 4, shuffle=False), collate_fn=TokenDataset.collate
    )
    seen = 0
    for ids, metadata in loader:
        assert ids.dtype == torch.int32 and ids.ndim == 3 and int(ids.max()) < 1000
        assert [list(ids.shape[1:])] == [m["shape"][1:] for m in metadata[:1]]
        seen += len(metadata)
    assert seen == len(dataset)
    first = dataset[0]
    assert first["ids"].dtype == torch.int32 and first["ids"].shape == tuple(first["shape"][1:])
    pixels = dataset.decode(0, tokenizer)
    assert tuple(pixels.shape[-2:]) == dataset.token_file(0).original_size
    assert torch.equal(pixels, tokenizer.decode(dataset.token_file(0), output_dtype=torch.uint8))
    continuous = ["--input", folder, "--output", tmp_path / "refused", "--model", IMAGE_MODEL, "--tokens"]
    assert _run(continuous) == 1  # refused on the driver: sd-vae-tiny has no quantizer
