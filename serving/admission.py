"""Admission sized to what can finish: shed at once what the queue cannot serve in time.

The rule (one :class:`Admission` per model, in the ingress): a request costs ``units`` = the pixels
the model reads or writes for it (``tokenizers_svc.limits``; at least the batching quantum
``max_batch_pixels / max_batch_size``). Its estimated service time is ``units * rate``, where
``rate`` is the largest of the last ``RECENT`` seconds-per-unit the replicas reported (their model
time, a batch shared by units): the largest, because underestimating costs 504s after a long wait
while overestimating costs an early 503 that the client retries. Work already admitted and unanswered waits ahead of it, spread over the
replicas. When ``wait + own > HEADROOM * request_timeout_s`` (a quarter of the timeout is kept
for estimate error) and something is ahead, the request is answered 503 + ``Retry-After`` (the
seconds until enough of the queue has drained) without being queued.
Until a rate is measured, at most what the replicas run at once is admitted. A request alone is
always admitted: the caps bound it, and if it times out its work is abandoned at the next tile.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from tokenizers_svc.errors import OverloadedError

RECENT = 8  # service times the rate is taken from
HEADROOM = 0.75  # admit what the estimate finishes within this share of the timeout


@dataclass(frozen=True)
class Ticket:
    """An admitted request: what it was priced at, so its release takes the same amount back."""

    method: str
    units: int
    estimate_s: float


class Admission:
    """Per-model admission state; the ingress handles requests on one event loop, so no lock."""

    def __init__(
        self, model: str, timeout_s: float, replicas: int, concurrency: int, retry_after_s: int
    ) -> None:
        self.model = model
        self.timeout_s = timeout_s
        self.replicas = max(1, replicas)
        self.concurrency = concurrency  # requests one replica runs at once (max_ongoing_requests)
        self.retry_after_s = retry_after_s
        self.recent: dict[str, deque[float]] = {}  # method -> last seconds per unit measured
        self.in_flight = 0
        self.outstanding_s = 0.0

    def admit(self, method: str, units: int) -> Ticket:
        """A ticket, or OverloadedError (503) when the request could not be served in time."""
        rate = max(self.recent[method]) if self.recent.get(method) else None
        if rate is None:
            if self.in_flight >= self.replicas * self.concurrency:
                raise self._overloaded(
                    self.retry_after_s, "no service time measured yet and every slot is busy"
                )
            estimate = 0.0
        else:
            estimate = units * rate
            wait = self.outstanding_s / self.replicas
            budget = HEADROOM * self.timeout_s
            if self.in_flight and wait + estimate > budget:
                retry = max(self.retry_after_s, math.ceil(wait + estimate - budget))
                raise self._overloaded(
                    retry,
                    f"the queue ahead needs about {wait:.1f} s and this request {estimate:.1f} s; "
                    f"requests must finish well within the {self.timeout_s:g} s timeout",
                )
        self.in_flight += 1
        self.outstanding_s += estimate
        return Ticket(method, units, estimate)

    def release(self, ticket: Ticket, compute_s: float | None) -> None:
        """The request is answered; ``compute_s`` (model time the replica reported) updates the rate."""
        self.in_flight -= 1
        self.outstanding_s = max(0.0, self.outstanding_s - ticket.estimate_s)
        if compute_s:
            self.recent.setdefault(ticket.method, deque(maxlen=RECENT)).append(compute_s / ticket.units)

    def _overloaded(self, retry_after: int, why: str) -> OverloadedError:
        return OverloadedError(
            f"{self.model} cannot serve this request in time ({why}); retry after {retry_after} s",
            param="model",
            retry_after=retry_after,
        )
