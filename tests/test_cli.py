"""The ``tokenizers-svc`` command, in process (CliRunner) and as the installed console script."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from skimage import data as skdata
from typer.testing import CliRunner

from tokenizers_svc import media
from tokenizers_svc.cli import _delegate, app
from tokenizers_svc.latents import load_latents
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.registry import list_presets

runner = CliRunner()
VIDEO_PRESETS = ("video-vae-tiny", "wan-vae-tiny", "cogvideox-vae-tiny", "cosmos-vae-tiny", "vitok-tiny-2x8")


@pytest.fixture()
def photos(tmp_path) -> list[Path]:
    """Two real photos (scikit-image) as small PNG and JPEG files with odd sizes."""
    first = tmp_path / "astronaut.png"
    first.write_bytes(
        media.encode_image(np.ascontiguousarray(skdata.astronaut()[50:250:5, 150:360:5]), "png")
    )
    second = tmp_path / "coffee.jpg"
    second.write_bytes(media.encode_image(np.ascontiguousarray(skdata.coffee()[0:300:6, 0:330:6]), "jpeg"))
    return [first, second]


def test_models_table_and_json():
    table = runner.invoke(app, ["models"])
    assert table.exit_code == 0, table.output
    header, *rows = table.stdout.splitlines()
    assert header.split()[:4] == ["NAME", "FAMILY", "MODALITY", "SPATIAL"]
    tiny = next(r.split() for r in rows if r.startswith("sd-vae-tiny "))
    assert tiny[1:10] == ["AutoencoderKL", "image", "2", "1", "4", "any", "3.0", "scale", "0.18215"]
    flux = next(r for r in rows if r.startswith("flux-vae "))
    assert "shift 0.1159 scale 0.3611" in flux
    listing = json.loads(runner.invoke(app, ["models", "--json"]).stdout)
    assert {row["name"] for row in listing} == {p.name for p in list_presets()}
    assert all("params" not in row for row in listing)  # --stats counts them
    for name in ("tsvc-image-f8c4", "tsvc-video-f16t4c16"):  # config.json / weights buffers, unloaded
        default = next(r for r in listing if r["name"] == name)
        constants = load_tokenizer(name).spec.normalization.constants()
        assert default["normalization"].keys() == constants.keys(), name
        for key, value in constants.items():  # float32 buffers for video: approx
            assert default["normalization"][key] == pytest.approx(value, rel=1e-6), (name, key)
    stats = json.loads(runner.invoke(app, ["models", "--json", "--stats"]).stdout)
    row = next(r for r in stats if r["name"] == "sd-vae-tiny")
    module = load_tokenizer("sd-vae-tiny").module
    assert row["params"] == sum(p.numel() for p in module.parameters())
    assert row["normalization"] == {"scaling_factor": 0.18215, "shift_factor": 0.0}
    assert row["compression_ratio"] == pytest.approx(3.0)  # f2 c4: 3*2*2/4
    assert row["weights"] == "random-init"


@pytest.mark.parametrize("argv", [["--help"], ["models"], ["models", "--json"]])
def test_light_commands_import_no_heavy_module(argv):
    """`--help` and the registry listing start fast because they import neither torch nor diffusers,
    Ray, PyAV or numpy (the listing reads the presets' configs)."""
    heavy = ("torch", "diffusers", "ray", "av", "numpy")
    script = (
        "import sys\nfrom tokenizers_svc.cli import app\n"
        f"sys.argv = ['tokenizers-svc', *{argv!r}]\n"
        "try:\n    app()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stderr[-2000:]


def test_help_shows_docstrings_as_written(monkeypatch):
    """Command help is the docstring, reflowed: brackets are text, not style tags (``mean[c]`` was
    shown as ``mean``), and a paragraph's line breaks are not kept mid-sentence."""
    monkeypatch.setenv("COLUMNS", "200")  # one line per paragraph, whatever the terminal
    result = runner.invoke(app, ["models", "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(line.strip(" │") for line in result.output.splitlines())
    assert "(raw - shift - mean[c]) / std[c] * scale" in text, result.output
    assert "NORMALIZATION is what diffusion-ready latents are" in text, result.output


def test_encode_info_decode_one_image(photos, tmp_path):
    out = tmp_path / "astronaut.safetensors"
    result = runner.invoke(app, ["encode", str(photos[0]), "-o", str(out), "-m", "sd-vae-tiny", "--raw"])
    assert result.exit_code == 0, result.output
    latents = load_latents(out)
    assert latents.tokenizer == "sd-vae-tiny" and not latents.normalized
    assert latents.original_size == (40, 42) and latents.latents.shape == (1, 4, 20, 21)
    info = runner.invoke(app, ["info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    summary = json.loads(info.stdout)
    assert summary["original_size"] == [40, 42] and summary["normalized"] is False
    assert summary["source_sha256"] == latents.source_sha256
    checked = runner.invoke(app, ["info", str(out), "--model", "sd-vae-tiny"])
    assert checked.exit_code == 0 and "valid_for         sd-vae-tiny" in checked.stdout
    assert "normalization     scale 0.18215" in checked.stdout
    assert summary["scaling_constants"] == {"scaling_factor": 0.18215, "shift_factor": 0.0}
    png = tmp_path / "back.png"
    decoded = runner.invoke(app, ["decode", str(out), "-o", str(png)])  # model from the file
    assert decoded.exit_code == 0, decoded.output
    assert media.read_image(png).shape == (40, 42, 3)


def test_encode_options_reach_the_latents(photos, tmp_path):
    out = tmp_path / "p.safetensors"
    args = ["encode", str(photos[1]), "-o", str(out), "-m", "sd-vae-tiny"]
    result = runner.invoke(app, [*args, "--resize", "shorter-side", "--resolution", "24", "--posterior"])
    assert result.exit_code == 0, result.output
    latents = load_latents(out)
    assert latents.normalized and latents.resized_from == (50, 55)
    assert min(latents.original_size) == 24 and latents.mean is not None
    sampled = runner.invoke(
        app, [*args, "--sample", "--seed", "1", "--tile-size", "32", "--tile-overlap", "8", "--overwrite"]
    )
    assert sampled.exit_code == 0, sampled.output
    assert load_latents(out).sampled


def test_multi_file_with_one_failure(photos, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(photos[0].read_bytes()[:300])  # truncated PNG
    out_dir = tmp_path / "latents"
    result = runner.invoke(
        app, ["encode", *map(str, photos), str(broken), "-o", str(out_dir), "-m", "sd-vae-tiny"]
    )
    assert result.exit_code == 1
    assert "broken.png: invalid_media" in result.stderr and "1 of 3 inputs failed" in result.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["astronaut.safetensors", "coffee.safetensors"]
    assert re.search(
        r"encode: 3/3 files \(100%\), [\d.]+ file/s, ETA 0 s", result.stderr
    )  # not a TTY: a line


def test_long_video_shows_progress_per_chunk_in_logs(shared_data, tmp_path):
    """A clip encoded and decoded in temporal chunks reports chunks done, rate and ETA on stderr as
    plain lines (the runner's stderr is not a terminal, as in a log)."""
    clip, latents, back = (
        shared_data / "videos" / "carphone_pristine.mp4",
        tmp_path / "c.st",
        tmp_path / "c.mp4",
    )
    args = [
        "-m",
        "video-vae-tiny",
        "--max-frames",
        "25",
        "--chunk-frames",
        "9",
    ]  # 6 latent groups, 2 per chunk
    encoded = runner.invoke(app, ["encode", str(clip), "-o", str(latents), *args])
    assert encoded.exit_code == 0, encoded.output
    assert re.search(
        r"^encode carphone_pristine.mp4: (\d+)/\1 chunks \(100%\), [\d.]+ chunk/s", encoded.stderr, re.M
    )
    decoded = runner.invoke(app, ["decode", str(latents), "-o", str(back)])
    assert decoded.exit_code == 0, decoded.output
    assert "decode c.st" not in decoded.stderr  # decoding uses the default chunking: one pass here


def test_directory_input_and_name_collisions(photos, tmp_path):
    out_dir = tmp_path / "out"
    result = runner.invoke(app, ["encode", str(tmp_path), "-o", str(out_dir), "-m", "sd-vae-tiny"])
    assert result.exit_code == 0, result.output
    assert len(list(out_dir.iterdir())) == 2
    single_dir = tmp_path / "only"
    single_dir.mkdir()
    shutil.copy(photos[1], single_dir)
    nested = tmp_path / "new" / "deeper"
    assert (
        runner.invoke(app, ["encode", str(single_dir), "-o", str(nested), "-m", "sd-vae-tiny"]).exit_code == 0
    )
    assert [p.name for p in nested.iterdir()] == [
        "coffee.safetensors"
    ]  # a directory input means OUT is a dir
    twin = tmp_path / "sub" / "astronaut.png"
    twin.parent.mkdir()
    shutil.copy(photos[0], twin)
    clash = runner.invoke(app, ["encode", str(photos[0]), str(twin), "-o", str(out_dir), "-m", "sd-vae-tiny"])
    assert clash.exit_code == 1 and "would both be written" in clash.stderr


def test_errors_exit_nonzero_with_message(photos, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"nope" * 10)
    info = runner.invoke(app, ["info", str(garbage)])
    assert info.exit_code == 1 and "error: invalid_latents: not a safetensors latent file" in info.stderr
    unknown = runner.invoke(app, ["encode", str(photos[0]), "-o", str(tmp_path / "x"), "-m", "no-such-model"])
    assert unknown.exit_code == 1 and "unsupported_model: unknown model 'no-such-model'" in unknown.stderr
    out = tmp_path / "a.safetensors"
    assert runner.invoke(app, ["encode", str(photos[0]), "-o", str(out), "-m", "sd-vae-tiny"]).exit_code == 0
    as_video = runner.invoke(app, ["decode", str(out), "-o", str(tmp_path / "a.mp4")])
    assert as_video.exit_code == 1 and "hold an image" in as_video.stderr
    gif = runner.invoke(app, ["decode", str(out), "-o", str(tmp_path / "a.gif")])
    assert gif.exit_code == 1 and "unsupported_media_type" in gif.stderr
    missing = runner.invoke(
        app, ["decode", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "a.png")]
    )
    assert missing.exit_code == 1 and "cannot read" in missing.stderr
    bad_device = runner.invoke(app, ["decode", str(out), "-o", str(tmp_path / "b.png"), "--device", "tpu9"])
    assert bad_device.exit_code == 1 and "--device must be a torch device" in bad_device.stderr
    alone = runner.invoke(
        app, ["encode", str(photos[0]), "-o", str(tmp_path / "r.safetensors"), "--resolution", "32"]
    )
    assert alone.exit_code == 1 and "resolution=32 needs resize='shorter-side'" in alone.stderr, alone.output
    assert not (tmp_path / "r.safetensors").exists()


def test_passthrough_delegation(tmp_path, monkeypatch):
    (tmp_path / "fake_entry.py").write_text(
        "def main(argv):\n    print('argv=' + ','.join(argv))\n    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(typer.Exit) as done:
        _delegate("fake_entry", ["--port", "1", "--help"])
    assert done.value.exit_code == 3
    with pytest.raises(typer.Exit) as missing:
        _delegate("serving.not_a_module", [])
    assert missing.value.exit_code == 2
    with pytest.raises(typer.Exit) as no_main:
        _delegate("json", [])  # importable, but no main(argv)
    assert no_main.value.exit_code == 2


@pytest.mark.slow
def test_installed_console_script(shared_data, tmp_path):
    """The real installed ``tokenizers-svc`` on a real photo of odd size: the entry point, as a shell
    meets it. (The README's CLI block runs it on the sample clip too: tests/test_docs_run.py.)"""
    script = Path(sys.executable).with_name("tokenizers-svc")
    assert script.exists(), f"console script missing at {script}; run `make install`"
    photo = shared_data / "images" / "val" / "plant.jpg"
    small = tmp_path / "plant.png"
    small.write_bytes(media.encode_image(media.read_image(photo)[::4, ::4], "png"))  # 84x125, odd sizes
    latents, back = tmp_path / "plant.safetensors", tmp_path / "plant.webp"
    subprocess.run([script, "encode", small, "-o", latents, "-m", "sd-vae-tiny"], check=True, timeout=300)
    subprocess.run([script, "decode", latents, "-o", back], check=True, timeout=300)
    assert media.read_image(back).shape == (84, 125, 3)


def test_real_clip_round_trips_at_its_size_and_frame_rate(shared_data, tmp_path):
    """A real 176x144 clip at 29.97 fps: encode 5 frames, decode back to MP4 at the same size and rate."""
    registered = {p.name for p in list_presets()}
    video_model = next((name for name in VIDEO_PRESETS if name in registered), None)
    if video_model is None:
        pytest.skip(f"no tiny video preset registered ({', '.join(VIDEO_PRESETS)})")
    clip = shared_data / "videos" / "carphone_pristine.mp4"
    clip_latents, clip_back = tmp_path / "clip.safetensors", tmp_path / "clip.mp4"
    encoded = runner.invoke(
        app, ["encode", str(clip), "-o", str(clip_latents), "-m", video_model, "--max-frames", "5"]
    )
    assert encoded.exit_code == 0, encoded.output
    decoded = runner.invoke(app, ["decode", str(clip_latents), "-o", str(clip_back)])
    assert decoded.exit_code == 0, decoded.output
    video = media.read_video(clip_back)
    assert video.frames.shape == (5, 144, 176, 3)
    assert video.fps == pytest.approx(30000 / 1001, abs=1e-3)


def test_local_weights_are_listed_and_loadable(photos, tmp_path, monkeypatch):
    home = tmp_path / "home"
    load_tokenizer("sd-vae-tiny").module.save_pretrained(str(home / "weights" / "sd-vae-tiny"))
    monkeypatch.setenv("TOKENIZERS_SVC_HOME", str(home))
    row = next(
        r for r in json.loads(runner.invoke(app, ["models", "--json"]).stdout) if r["name"] == "sd-vae-tiny"
    )
    assert row["weights"] == "yes" and row["latent_channels"] == 4
    out = tmp_path / "a.safetensors"
    model_dir = str(home / "weights" / "sd-vae-tiny")
    assert runner.invoke(app, ["encode", str(photos[0]), "-o", str(out), "-m", "sd-vae-tiny"]).exit_code == 0
    from_dir = runner.invoke(app, ["decode", str(out), "-o", str(tmp_path / "a.png"), "-m", model_dir])
    # a directory is named after its folder, so the latent file's tokenizer name still matches
    assert from_dir.exit_code == 0, from_dir.output


def _png_header_bomb(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, in a few hundred bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000))


def test_encode_applies_the_servers_limits(tmp_path, photos):
    """Issue 13 case 8: the CLI refuses what the server refuses (16 MP per frame, after --resize),
    one error line and exit 1; --set-limit raises a cap, a typo in it is an error."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_bomb(5000, 4000))  # 20 MP: under the old 64 MP CLI default
    result = runner.invoke(
        app, ["encode", str(bomb), "-o", str(tmp_path / "b.safetensors"), "-m", "sd-vae-tiny"]
    )
    assert result.exit_code == 1
    # One progress line ("loading MODEL ...") and then exactly one error line, no traceback.
    assert result.stderr.strip().splitlines() == [
        "loading sd-vae-tiny (cpu, float32)",
        f"error: {bomb}: limit_exceeded: PNG image is 5000x4000 = 20,000,000 pixels; the limit is 16,000,000 pixels",
    ]
    upscale = ["encode", str(photos[0]), "-o", str(tmp_path / "u.safetensors"), "-m", "sd-vae-tiny"]
    result = runner.invoke(app, [*upscale, "--resize", "fit", "--resolution", "20000"])
    assert result.exit_code == 1 and "pixels per frame; the limit is 16,000,000" in result.stderr
    result = runner.invoke(
        app, [*upscale, "--resize", "fit", "--resolution", "64", "--set-limit", "max_pixels=1000"]
    )
    assert result.exit_code == 1 and "the limit is 1,000" in result.stderr
    result = runner.invoke(app, [*upscale, "--set-limit", "max_pixel=1"])
    assert result.exit_code == 1 and "expected NAME=VALUE with NAME one of" in result.stderr


def test_unwritable_outputs_are_one_error_line(tmp_path, photos):
    latent = tmp_path / "a.safetensors"
    assert (
        runner.invoke(app, ["encode", str(photos[0]), "-o", str(latent), "-m", "sd-vae-tiny"]).exit_code == 0
    )
    for argv in (
        ["encode", str(photos[0]), "-o", "/proc/nope/x.safetensors", "-m", "sd-vae-tiny"],
        ["decode", str(latent), "-o", "/proc/nope/x.png"],
        ["decode", str(latent), "-o", "/proc/version.png"],  # the directory exists; the file is not writable
    ):
        result = runner.invoke(app, argv)
        assert result.exit_code == 1, argv
        (line,) = [line for line in result.stderr.strip().splitlines() if not line.startswith("loading ")]
        assert line.startswith("error: invalid_request: cannot ") and "Traceback" not in result.output


def _no_temporary_files(folder: Path) -> bool:
    return not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_outputs_are_never_overwritten_unless_asked_nor_written_through_a_symlink(photos, tmp_path):
    """Issue 27 item 13: encode and decode replaced existing files silently and wrote through a
    symlink into its target. Now: refused before any work unless --overwrite; a symlink at the
    output is replaced by the new file, its target untouched; no temporary file is left behind."""
    out = tmp_path / "a.safetensors"
    encode = ["encode", str(photos[0]), "-o", str(out), "-m", "sd-vae-tiny"]
    assert runner.invoke(app, encode).exit_code == 0
    first = out.read_bytes()
    again = runner.invoke(app, [*encode, "--raw"])
    assert again.exit_code == 1
    assert (
        again.stderr.strip()
        == f"error: invalid_request: output {str(out)!r} exists; pass --overwrite to replace it"
    )
    assert out.read_bytes() == first
    assert runner.invoke(app, [*encode, "--raw", "--overwrite"]).exit_code == 0
    assert not load_latents(out).normalized

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for argv, link in (
        (["encode", str(photos[1]), "-m", "sd-vae-tiny"], tmp_path / "link.safetensors"),
        (["decode", str(out)], tmp_path / "link.png"),
    ):
        link.symlink_to(victim)
        refused = runner.invoke(app, [*argv, "-o", str(link)])
        assert refused.exit_code == 1 and "exists; pass --overwrite" in refused.stderr, refused.output
        replaced = runner.invoke(app, [*argv, "-o", str(link), "--overwrite"])
        assert replaced.exit_code == 0, replaced.output
        assert not link.is_symlink() and victim.read_text() == "keep me"
    assert media.read_image(tmp_path / "link.png").shape == (40, 42, 3)

    png = tmp_path / "back.png"
    png.write_bytes(b"an older file")
    refused = runner.invoke(app, ["decode", str(out), "-o", str(png)])
    assert refused.exit_code == 1 and png.read_bytes() == b"an older file"
    assert _no_temporary_files(tmp_path)


def test_an_interrupted_write_leaves_no_half_file(photos, tmp_path, monkeypatch):
    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tokenizers_svc.cli.os.replace", fail)
    out = tmp_path / "a.safetensors"
    result = runner.invoke(app, ["encode", str(photos[0]), "-o", str(out), "-m", "sd-vae-tiny"])
    assert result.exit_code == 1 and "cannot write" in result.stderr and "No space left" in result.stderr
    assert not out.exists() and _no_temporary_files(tmp_path)


@pytest.mark.parametrize("fps", ["1e-300", "0", "-1", "nan", "inf", "1e9"])
def test_decode_fps_must_be_a_writable_frame_rate(tmp_path, fps):
    """Issue 27 item 11: --fps 1e-300 was written at 24 fps without a word."""
    result = runner.invoke(
        app, ["decode", str(tmp_path / "x.safetensors"), "-o", str(tmp_path / "x.mp4"), "--fps", fps]
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("error: invalid_request: --fps must be a frame rate in [0.001, 1000]")


def test_a_one_pixel_image_encodes_and_decodes(tmp_path):
    """Issue 27 item 2: a 1x1 image raised ValueError in GroupNorm, printed as a traceback."""
    dot = tmp_path / "dot.png"
    dot.write_bytes(media.encode_image(np.full((1, 1, 3), 90, dtype=np.uint8), "png"))
    latents, back = tmp_path / "dot.safetensors", tmp_path / "dot.png.png"
    result = runner.invoke(app, ["encode", str(dot), "-o", str(latents), "-m", "sd-vae-tiny"])
    assert result.exit_code == 0, result.output
    assert load_latents(latents).padding == (3, 3, 0)  # up to sd-vae-tiny's 4x4 minimum
    assert runner.invoke(app, ["decode", str(latents), "-o", str(back)]).exit_code == 0
    assert media.read_image(back).shape == (1, 1, 3)
