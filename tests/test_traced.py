"""Traced inference calls (tokenizers_svc/traced.py): a hot shape runs as a graph whose results equal
eager ones on content it was not traced on, for every family that opts in; what is not inference,
or cannot be traced faithfully, stays eager."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from tokenizers_svc import traced
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.registry import backend_for
from tokenizers_svc.traced import HOT_CALLS, TRACED_ENV, TracedCalls


def _content(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:  # as decoded media arrive: converted inside the traced call
        return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    return torch.rand(shape, generator=generator) * 2 - 1


# Every family with traced_inference = True, through a model of it (the shipped DC-AE defaults:
# the image default and the discrete one, whose FSQ runs after the traced encoder).
OPTED_IN = ["tsvc-image-f8c4", "tsvc-image-f8-fsq1000"]


def test_every_family_that_opts_in_is_checked_here():
    families = {type(load_tokenizer(name).backend) for name in OPTED_IN}
    assert all(family.traced_inference for family in families)
    assert backend_for("AutoencoderKL").traced_inference is False  # the others stay eager


@pytest.mark.parametrize("name", OPTED_IN)
@pytest.mark.parametrize("side", [32, 64])  # 32: one 4x4 latent, where DC-AE's attention branches
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_traced_calls_equal_eager_on_new_content(name, side, dtype, monkeypatch):
    tokenizer = load_tokenizer(name)
    traced_content = _content(0, (1, 3, side, side), dtype)
    for _ in range(HOT_CALLS):  # the HOT_CALLS-th call traces this shape
        latents = tokenizer.encode(traced_content)
        tokenizer.decode(latents)
    encode, decode = tokenizer.backend.inference_moments, tokenizer.backend.inference_pixels
    assert len(encode.graphs) == 1 and len(decode.graphs) == 1

    new = _content(1, (1, 3, side, side), dtype)
    traced_latents = tokenizer.encode(new)
    traced_pixels = tokenizer.decode(traced_latents)
    monkeypatch.setenv(TRACED_ENV, "0")
    eager_latents = tokenizer.encode(new)
    eager_pixels = tokenizer.decode(eager_latents)
    assert torch.allclose(traced_latents.latents, eager_latents.latents, atol=1e-5, rtol=1e-5)
    assert torch.allclose(traced_pixels, eager_pixels, atol=1e-5, rtol=1e-5)
    assert not torch.equal(traced_latents.latents, tokenizer.encode(traced_content).latents)


def _calls(fn, module: nn.Module | None = None) -> TracedCalls:
    return TracedCalls(fn, module or nn.Linear(4, 4), "test")


def test_hot_shapes_are_traced_cold_ones_are_not_and_least_recent_graphs_are_dropped(monkeypatch):
    monkeypatch.setattr(traced, "MAX_SHAPES", 2)
    layer = nn.Linear(4, 4).eval()
    calls = _calls(layer, layer)
    with torch.no_grad():
        for rows in (1, 2, 3):  # each hot in turn
            for _ in range(HOT_CALLS):
                calls(torch.ones(rows, 4))
        assert [key[0] for key in calls.graphs] == [(2, 4), (3, 4)]
        x = _content(2, (3, 4))
        assert torch.equal(calls(x), layer(x))
        # many shapes, each a few times within the window (a folder's aspect ratios): none is hot
        for _ in range(3):
            for rows in range(10, 10 + traced.HOT_WINDOW // HOT_CALLS + 1):
                calls(torch.ones(rows, 4))
        assert [key[0] for key in calls.graphs] == [(2, 4), (3, 4)]


def test_a_traced_shape_keeps_its_heat_so_rare_shapes_stay_eager_and_nothing_is_retraced(monkeypatch):
    """A job's photos: one common shape (half the calls) among six rare ones (~8% each). Once the
    common shape runs traced, its calls still count, so no rare shape reaches HOT_CALLS of the window
    (counting eager calls only, each rare one did, was traced, and was dropped past MAX_SHAPES)."""
    monkeypatch.setattr(traced, "MAX_SHAPES", 2)
    traces = []
    real_trace = torch.jit.trace
    monkeypatch.setattr(torch.jit, "trace", lambda *a, **k: traces.append(a[1].shape) or real_trace(*a, **k))
    layer = nn.Linear(4, 4).eval()
    calls = _calls(layer, layer)
    with torch.no_grad():
        for _ in range(3 * traced.HOT_WINDOW // 12):
            for rare in range(10, 16):
                calls(torch.ones(1, 4))
                calls(torch.ones(rare, 4))
    assert [key[0] for key in calls.graphs] == [(1, 4)]
    assert traces == [torch.Size([1, 4])]


def test_outputs_keep_their_structure_with_nones():
    layer = nn.Linear(4, 4).eval()
    calls = _calls(lambda x: (layer(x), None), layer)
    with torch.no_grad():
        results = [calls(torch.ones(2, 4)) for _ in range(HOT_CALLS + 1)]
    assert len(calls.graphs) == 1
    assert all(out[1] is None and torch.equal(out[0], results[0][0]) for out in results)


def test_a_graph_that_differs_from_eager_is_refused_and_the_shape_stays_eager():
    counter = itertools.count()  # Python state a trace freezes: the graph adds the trace-time value
    layer = nn.Linear(4, 4).eval()
    calls = _calls(lambda x: layer(x) + next(counter), layer)
    with torch.no_grad():
        for _ in range(HOT_CALLS + 2):
            calls(torch.zeros(1, 4))
    assert not calls.graphs and calls.refused
    with torch.no_grad():  # eager calls 0..HOT_CALLS+1, the trace one more: this call adds HOT_CALLS+3
        expected = torch.full((1, 4), float(HOT_CALLS + 3))
        assert torch.equal(calls(torch.zeros(1, 4)) - layer(torch.zeros(1, 4)), expected)


def test_training_and_autograd_run_eager():
    layer = nn.Linear(4, 4)
    calls = _calls(layer, layer)
    for _ in range(HOT_CALLS + 1):
        calls(torch.ones(1, 4)).sum().backward()  # autograd on
    layer.train()
    with torch.no_grad():
        for _ in range(HOT_CALLS + 1):
            calls(torch.ones(1, 4))
    assert not calls.graphs and not calls.seen
    assert layer.weight.grad is not None


def test_moving_the_model_forgets_its_graphs():
    tokenizer = load_tokenizer("tsvc-image-f8c4")
    for _ in range(HOT_CALLS):
        tokenizer.encode(_content(0, (1, 3, 32, 32)))
    assert tokenizer.backend.inference_moments.graphs
    tokenizer.to(dtype=torch.bfloat16)
    assert not tokenizer.backend.inference_moments.graphs
    latents = [tokenizer.encode(_content(0, (1, 3, 32, 32))) for _ in range(HOT_CALLS + 1)]
    assert latents[-1].latents.dtype == torch.float32 and torch.equal(
        latents[-1].latents, latents[-2].latents
    )
