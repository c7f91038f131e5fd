"""The encode options: the CLI, the HTTP query model and the batch job's flags all declare what
``tokenizers_svc.options`` defines (names, defaults, help texts, choices), and its defaults are the
library's own."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest
import typer

from serving.batch.driver import build_parser
from serving.schemas import EncodeParams
from tokenizers_svc.cli import app
from tokenizers_svc.options import ENCODE_OPTIONS, add_arguments, cli_help
from tokenizers_svc.pipeline import EncodeOptions
from tokenizers_svc.pixels import RESIZE_POLICIES
from tokenizers_svc.tiling import TilingOptions, tiling_options


def _cli_encode_options() -> dict:
    """The encode command's options by flag (click's, as typer built them)."""
    command = typer.main.get_command(app).commands["encode"]
    return {opt: param for param in command.params if param.param_type_name == "option" for opt in param.opts}


def _batch_actions() -> dict[str, argparse.Action]:
    return {action.dest: action for action in build_parser()._actions}


@pytest.mark.parametrize("name", sorted(ENCODE_OPTIONS))
def test_http_query_model_declares_the_definition(name):
    option = ENCODE_OPTIONS[name]
    field = EncodeParams.model_fields[name]
    assert field.default == option.default
    assert field.description == option.help


@pytest.mark.parametrize("name", sorted(ENCODE_OPTIONS))
def test_cli_declares_the_definition(name):
    option = ENCODE_OPTIONS[name]
    declared = _cli_encode_options()
    param = declared[option.flags[0]]
    assert set(param.opts) == set(option.flags)
    assert param.help == cli_help(option)
    if option.is_switch:
        assert param.is_flag and param.default is False
    else:
        assert param.default == option.default
    if option.choices is not None:
        assert tuple(choice.value for choice in type(param.default)) == option.choices  # a str Enum


def test_batch_job_declares_the_definition():
    actions = _batch_actions()
    shared = [name for name in ENCODE_OPTIONS if name in actions]
    assert set(shared) >= {"resize", "resolution", "normalize", "sample", "seed", "stride", "max_frames"}
    parsed = build_parser().parse_args(["--input", "x", "--output", "y"])
    for name in shared:
        option, action = ENCODE_OPTIONS[name], actions[name]
        assert set(action.option_strings) == set(option.flags)
        assert action.help == cli_help(option)
        assert getattr(parsed, name) == option.default
        assert action.choices == option.choices


def test_every_option_is_understood_by_the_library_with_the_same_default():
    """from_flags reads every defined name, and leaving one out means the library's default."""
    defaults = EncodeOptions()
    option_fields = {f.name for f in fields(EncodeOptions)} - {"tiling"}
    tiling_names = {"tiling", "tile_size", "tile_overlap", "chunk_frames"}
    assert set(ENCODE_OPTIONS) == option_fields | tiling_names
    for name in option_fields:
        assert ENCODE_OPTIONS[name].default == getattr(defaults, name), name
    assert ENCODE_OPTIONS["resize"].choices == RESIZE_POLICIES
    assert EncodeOptions.from_flags({name: o.default for name, o in ENCODE_OPTIONS.items()}) == defaults
    sizes = tiling_options(True)
    assert (sizes.tile_size, sizes.tile_overlap, sizes.chunk_frames) == (
        TilingOptions.tile_size,
        TilingOptions.tile_overlap,
        TilingOptions.chunk_frames,
    )
    for name in ("tile_size", "tile_overlap", "chunk_frames"):
        assert f"(default {getattr(TilingOptions, name)})" in ENCODE_OPTIONS[name].help


def test_switches_set_their_value_on_the_command_lines():
    parser = argparse.ArgumentParser()
    add_arguments(parser, tuple(ENCODE_OPTIONS))
    assert vars(parser.parse_args([])) == {name: o.default for name, o in ENCODE_OPTIONS.items()}
    given = parser.parse_args(
        ["--raw", "--posterior", "--no-tiling", "--sample", "--resize", "fit", "--resolution", "128"]
    )
    options = EncodeOptions.from_flags(vars(given))
    assert (options.normalize, options.return_posterior, options.sample, options.resize) == (
        False,
        True,
        True,
        "fit",
    )
    assert options.resolution == 128
    assert options.tiling == TilingOptions(enabled=False)
    assert parser.parse_args(["--no-normalize"]).normalize is False
