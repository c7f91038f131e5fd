"""Hot input shapes of a model's inference calls, run as traced TorchScript graphs.

Why: an eager forward returns to Python between ops and takes the GIL back after each of them. In
a process where other threads run Python (a replica's event loop taking HTTP bodies, decoding
media, writing latent files), those hand-offs wait. A 256² encode of the image default took 10-25%
longer in a thread beside one busy with Python 20-50% of the time; traced, it took the same time
as alone, and ~5% less than eager alone (docs/benchmarks.md, "Traced model calls"): a traced graph
runs in TorchScript's interpreter with the GIL released for the whole call.

How: a shape (with dtype and device) is traced once it is hot: ``HOT_CALLS`` of the last
``HOT_WINDOW`` calls had it. A trace with its check costs ~5-10 eager calls (~0.7 s for the image
default's encoder) and saves 5-25% of each later call, so it pays only for a shape that keeps
coming: a server's few sizes or a job's fixed resolution, not each of a folder's aspect ratios
(a job resizing photos by their shorter side saw 13 shapes, most of them a few times, and,
tracing at the second sighting, ran 0.89x the plain loop instead of 0.96x). The trace runs on that call's
own input, after the eager call whose result the caller gets; the graph is kept only if its result
on the same input equals the eager one (``TOLERANCE``), else that shape stays eager for good. At
most ``MAX_SHAPES`` graphs per call are kept, least recently used dropped. A graph shares the
module's parameters (a few MB each, not a copy of the weights). Only inference is traced: with
autograd on, or the module in training mode, calls run eager.

Families opt in (``Backend.traced_inference``) once a test shows their traced calls equal the eager
ones on content other than what was traced (tests/test_traced.py): tracing records tensor ops only,
so Python-side state or data-dependent branches would be frozen at the traced input's values.

``torch.jit.trace`` is deprecated upstream in favour of ``torch.compile``/``torch.export``; neither
gives a GIL-free call without a C++ toolchain at run time. If trace fails (or is gone), calls run
eager. ``TOKENIZERS_SVC_TRACED=0`` turns tracing off for the process.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections import Counter, OrderedDict, deque
from collections.abc import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

TRACED_ENV = "TOKENIZERS_SVC_TRACED"
# graphs kept per call; a server sees a few sizes, a batch job one or two. No more than
# HOT_WINDOW // HOT_CALLS shapes can be hot at once, so with these values every hot shape keeps its graph.
MAX_SHAPES = 8
HOT_WINDOW = 64  # the recent calls a shape's heat is counted in
HOT_CALLS = 8  # calls among them that make a shape hot
TOLERANCE = 1e-4  # max |traced - eager| relative to max(1, max |eager|), per output

Output = torch.Tensor | tuple[torch.Tensor | None, ...]

# What tracing a model prints and this module answers for: the tracer's notes on shape-dependent
# branches in model code (each graph is for one shape, and checked) and trace's deprecation notice.
# Process-wide filters, as narrow as that: warnings.catch_warnings is not thread-safe.
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"(diffusers|tokenizers_svc)\.")
warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.trace(_method)?` is deprecated", category=DeprecationWarning
)


def tracing_enabled() -> bool:
    return os.environ.get(TRACED_ENV, "1") != "0"


class _Outputs(nn.Module):
    """``fn(x)`` with its ``None`` outputs left out (a traced graph returns tensors only). Holds the
    model as a submodule, so the trace reads its parameters as parameters, shared, not copied."""

    def __init__(self, module: nn.Module, fn: Callable[[torch.Tensor], Output], kept: tuple[int, ...]):
        super().__init__()
        self.model = module
        self.fn = fn
        self.kept = kept

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.fn(x)
        out = out if isinstance(out, tuple) else (out,)
        return tuple(out[i] for i in self.kept)


class TracedCalls:
    """``calls(x)`` = ``fn(x)``: eager, or through the graph traced for x's shape once it is hot.

    ``fn``: x (one tensor) -> a tensor or a tuple of tensors and ``None``s, computed by ``module``.
    Thread-safe: a server's two lanes may call it at once."""

    def __init__(self, fn: Callable[[torch.Tensor], Output], module: nn.Module, name: str) -> None:
        self.fn = fn
        self.module = module
        self.name = name
        self.graphs: OrderedDict[tuple, tuple[torch.jit.ScriptModule, tuple[int, ...], int]] = OrderedDict()
        self.recent: deque[tuple] = deque()  # the keys of the last HOT_WINDOW calls
        self.seen: Counter[tuple] = Counter()  # how often each is in ``recent``
        self.refused: set[tuple] = set()
        self.tracing: set[tuple] = set()  # being traced by one caller; the others stay eager meanwhile
        self.lock = threading.Lock()

    def clear(self) -> None:
        """Forget every graph and count (the module moved to another device or dtype)."""
        with self.lock:
            self.graphs.clear()
            self.recent.clear()
            self.seen.clear()
            self.refused.clear()
            self.tracing.clear()

    def __call__(self, x: torch.Tensor) -> Output:
        if torch.is_grad_enabled() or self.module.training or not tracing_enabled():
            return self.fn(x)
        key = (tuple(x.shape), x.dtype, x.device, x.is_contiguous())
        with self.lock:
            hot = self._count(key)  # every call: a traced shape keeps its share of the window
            entry = self.graphs.get(key)
            if entry is not None:
                self.graphs.move_to_end(key)
            else:
                hot = hot and key not in self.refused and key not in self.tracing
                if hot:
                    self.tracing.add(key)
        if entry is not None:
            graph, kept, width = entry
            return _restore(_as_tuple(graph(x)), kept, width)
        result = self.fn(x)
        if hot:
            self._trace(key, x, result)
        return result

    def _count(self, key: tuple) -> bool:
        """Count a call of ``key`` (under the lock): whether the shape is now hot. Calls that ran a
        graph count too: counting eager calls only, a job whose two common shapes ran traced saw
        only its rare shapes in the window, each then "hot", traced, and dropped again past
        MAX_SHAPES, over and over (18 traces, 5 of 40 s, in 400 photos of 13 shapes)."""
        self.recent.append(key)
        self.seen[key] += 1
        if len(self.recent) > HOT_WINDOW:
            old = self.recent.popleft()
            self.seen[old] -= 1
            if not self.seen[old]:
                del self.seen[old]
        return self.seen[key] >= HOT_CALLS

    def _trace(self, key: tuple, x: torch.Tensor, eager: Output) -> None:
        outputs = eager if isinstance(eager, tuple) else (eager,)
        kept = tuple(i for i, out in enumerate(outputs) if out is not None)
        width = len(outputs) if isinstance(eager, tuple) else 0
        try:
            graph = torch.jit.trace(_Outputs(self.module, self.fn, kept), x, check_trace=False)
            traced = _as_tuple(graph(x))
            same = len(traced) == len(kept) and all(
                t.shape == outputs[i].shape and _close(t, outputs[i])
                for t, i in zip(traced, kept, strict=True)
            )
        except Exception as error:  # any failure to trace leaves the shape eager, never the call failed
            logger.info("%s: shape %s not traced (%s: %s)", self.name, key[0], type(error).__name__, error)
            same, graph = False, None
        with self.lock:
            self.tracing.discard(key)
            if not same:
                if graph is not None:
                    logger.warning(
                        "%s: the traced graph for shape %s differs from eager; it stays eager",
                        self.name,
                        key[0],
                    )
                self.refused.add(key)
                return
            self.graphs[key] = (graph, kept, width)
            while len(self.graphs) > MAX_SHAPES:
                self.graphs.popitem(last=False)


def _close(traced: torch.Tensor, eager: torch.Tensor) -> bool:
    if not eager.numel():
        return True
    scale = max(1.0, float(eager.abs().max()))
    return bool((traced.float() - eager.float()).abs().max() <= TOLERANCE * scale)


def _as_tuple(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _restore(traced: tuple[torch.Tensor, ...], kept: tuple[int, ...], width: int) -> Output:
    """The graph's tensors back in ``fn``'s structure: a lone tensor, or the tuple with its ``None``s."""
    if width == 0:
        return traced[0]
    out: list[torch.Tensor | None] = [None] * width
    for i, tensor in zip(kept, traced, strict=True):
        out[i] = tensor
    return tuple(out)
