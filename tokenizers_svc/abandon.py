"""Work that can be abandoned: a request that timed out, or whose client has gone, stops at the next
tile, chunk or batch boundary instead of running to its end on a replica nobody waits for.

The server wraps a request's work in :func:`scope` with a :class:`WorkToken` (its deadline, and a
flag set when the request is cancelled); the tiling loop and ``pipeline.run_in_groups`` call
:func:`checkpoint` between pieces, which raises RequestTimeoutError once the token is abandoned.
The token lives in a context variable, so ``asyncio.to_thread`` carries it into the worker thread;
callers that set none (the CLI, the batch job, the library) pay one lookup per tile.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar

from tokenizers_svc.errors import RequestTimeoutError


class WorkToken:
    """Abandoned once ``deadline`` (``time.time()`` seconds, comparable across processes of one
    host) has passed or :meth:`cancel` was called; a token made of ``parts`` (the requests of one
    batch) is abandoned only when every part is."""

    def __init__(self, deadline: float | None = None, parts: tuple[WorkToken, ...] = ()) -> None:
        self.deadline = deadline
        self.parts = parts
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def abandoned(self) -> bool:
        if self.parts:
            return all(part.abandoned for part in self.parts)
        return self._cancelled.is_set() or (self.deadline is not None and time.time() > self.deadline)


_current: ContextVar[WorkToken | None] = ContextVar("tokenizers_svc_work_token", default=None)


@contextlib.contextmanager
def scope(token: WorkToken) -> Iterator[WorkToken]:
    """Run the block's work under ``token``; a cancellation of the block cancels the token, so a
    thread it started stops at its next checkpoint."""
    reset = _current.set(token)
    try:
        yield token
    except BaseException:
        token.cancel()  # CancelledError (timed out, client gone) or a failure: nobody wants the rest
        raise
    finally:
        _current.reset(reset)


def checkpoint() -> None:
    """Raise RequestTimeoutError when the current work was abandoned; call between pieces of work."""
    token = _current.get()
    if token is not None and token.abandoned:
        raise RequestTimeoutError("the request was abandoned (timed out or the client left)", param="model")
