"""Property tests (hypothesis) of the library and the CLI on hostile and odd inputs (issue 27).

Bounded and reproducible in CI: a fixed number of examples per property, ``derandomize=True`` (the
same examples every run; change the seed by editing a strategy), no per-example deadline (CPU
runners are slow and shared). The HTTP side, on one Serve app, is ``tests/test_serving_reliability.py``.

- every family's tiny preset takes any image from 1x1 to 40x40 and gives it back at its size;
- the CLI, given random bytes as media and random option values, exits 0, 1 or 2 with one-line
  errors and never prints a traceback.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.helpers import small_presets
from tokenizers_svc import media
from tokenizers_svc.api import Tokenizer
from tokenizers_svc.cli import app
from tokenizers_svc.loading import load_tokenizer

BOUNDED = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
# one tiny preset per family (the smallest by parameters), so every family's minimum is exercised
FAMILY_PRESETS = {spec.family: name for name, spec in reversed(small_presets(3_000_000).items())}


@functools.cache
def _tokenizer(name: str) -> Tokenizer:
    return load_tokenizer(name)


@pytest.mark.slow  # every family, dozens of examples: ~30 s
@BOUNDED
@given(
    family=st.sampled_from(sorted(FAMILY_PRESETS)),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    value=st.integers(0, 255),
)
def test_every_family_takes_images_from_1_to_40_pixels_a_side(family, height, width, value):
    tokenizer = _tokenizer(FAMILY_PRESETS[family])
    pixels = torch.full((1, 3, height, width), value, dtype=torch.uint8)
    latents = tokenizer.encode(pixels)
    assert tokenizer.decode(latents, output_dtype=torch.uint8).shape[-2:] == (height, width)


MAGIC = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"\x00\x00\x00\x18ftypisom",
]
OPTION_VALUES = st.sampled_from(
    ["0", "1", "-1", "1e15", "nan", "inf", "-inf", "abc", "", "3.5", "99999999999"]
)


@BOUNDED
@given(
    head=st.sampled_from(MAGIC),
    tail=st.binary(max_size=600),
    option=st.sampled_from(
        ["--start", "--end", "--stride", "--max-frames", "--resolution", "--tile-size", "--seed"]
    ),
    value=OPTION_VALUES,
)
def test_the_cli_never_prints_a_traceback(tmp_path_factory, head, tail, option, value):
    """Random bytes behind real magic numbers, with an odd option value: a typed error (exit 1), a
    usage error (exit 2) or, rarely, success; never a traceback."""
    folder = tmp_path_factory.mktemp("cli")
    source = folder / "input.bin"
    source.write_bytes(head + tail)
    result = CliRunner().invoke(
        app,
        ["encode", str(source), "-o", str(folder / "out.safetensors"), "-m", "sd-vae-tiny", option, value],
    )
    assert result.exit_code in (0, 1, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    fps=st.sampled_from(["1e-300", "0.0001", "0.5", "nan"]),
)
def test_the_cli_round_trips_tiny_images_and_refuses_unwritable_frame_rates(
    tmp_path_factory, height, width, fps
):
    folder = tmp_path_factory.mktemp("tiny")
    image = folder / "tiny.png"
    image.write_bytes(media.encode_image(np.full((height, width, 3), 128, dtype=np.uint8), "png"))
    latent, back = folder / "tiny.safetensors", folder / "back.png"
    runner = CliRunner()
    assert runner.invoke(app, ["encode", str(image), "-o", str(latent), "-m", "sd-vae-tiny"]).exit_code == 0
    assert runner.invoke(app, ["decode", str(latent), "-o", str(back)]).exit_code == 0
    assert media.read_image(back).shape == (height, width, 3)
    refused = runner.invoke(app, ["decode", str(latent), "-o", str(folder / "x.mp4"), "--fps", fps])
    if fps == "0.5":  # a frame rate the mp4 writer takes; an image latent is still no video
        assert refused.exit_code == 1 and "hold an image" in refused.stderr
    else:
        assert refused.exit_code == 1 and "--fps must be a frame rate" in refused.stderr
    assert "Traceback" not in refused.output
