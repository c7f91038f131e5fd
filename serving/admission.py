"""Admission sized to what can finish: refuse at once what the queue, or the timeout itself, cannot serve.

The rule (one :class:`Admission` per model, in the ingress): a request costs ``units`` = the pixels
the model reads or writes for it (``tokenizers_svc.limits``; at least the batching quantum
``max_batch_pixels / max_batch_size``). Its estimated service time is ``units * rate``, where
``rate`` is taken from the last ``RECENT`` seconds-per-unit the replicas reported (their lane
seconds, ``serving.jobs.ModelTime``: the model time, a batch shared by units, and calls that ran
side by side sharing their wall time).

**Lanes.** A replica runs two lanes at once (``serving/worker.py``): *small* requests (``units <=
max_batch_pixels``: what batches) and *large* ones, each lane one model call at a time (with more
than one CPU, small calls that queue run side by side, one torch thread each: ``serving/threads.py``;
their lane seconds, not their wall time, say how fast the lane drains: two side by side take ~115 ms
each and drain one per ~57 ms). So a small request never waits behind a large one, only
behind other small ones, and admission counts the work ahead of a request in its own lane only.

**Too large for the timeout.** A large request whose estimate at the *typical* (median) recent
rate is at least ``request_timeout_s`` could not finish even alone: it is refused at once with 413,
naming the estimate and the timeout (it used to run until its 504 while others waited). Rates are
kept per method and lane: a small request is priced at no less than the batching quantum, so
small-lane rates understate the seconds per pixel of a large request; a large request is priced by
the large lane's rates (the small lane's until one is measured, so the first large request may
still run to its timeout). A large request that timed out with nothing ahead of it in its lane
counts as having needed the whole timeout, so the next one like it is refused at once. A small
request is at most one batch: it is never refused as too large (a batch that cannot finish within
the timeout is a configuration to change, not a request to refuse).

**Queue.** Work already admitted and unanswered in the lane waits ahead of a request, spread over
the replicas. When ``wait + own > HEADROOM * request_timeout_s`` (a quarter of the timeout is kept
for estimate error; here the *largest* recent rate, because underestimating costs 504s after a
long wait while overestimating costs an early 503 that the client retries) and something is
ahead, the request is answered 503 + ``Retry-After`` (the seconds until enough of the queue has
drained) without being queued. Until a rate is measured, at most what the replicas run at once is
admitted, and nothing is refused as too large.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from tokenizers_svc.errors import LimitExceededError, OverloadedError

RECENT = 8  # service times the rate is taken from
HEADROOM = 0.75  # admit what the estimate finishes within this share of the timeout
Lane = Literal["small", "large"]


def lane_for(units: int, max_batch_units: int) -> Lane:
    """The lane of a request of ``units``: small when it fits one batch, else large (the worker
    chooses the same way, from the same numbers)."""
    return "small" if units <= max_batch_units else "large"


@dataclass(frozen=True)
class Ticket:
    """An admitted request: what it was priced at, so its release takes the same amount back."""

    method: str
    units: int
    estimate_s: float
    lane: Lane
    alone: bool  # nothing was ahead of it in its lane: its time is its own work


@dataclass
class _LaneState:
    in_flight: int = 0
    outstanding_s: float = 0.0


@dataclass
class Admission:
    """Per-model admission state; the ingress handles requests on one event loop, so no lock.

    ``concurrency``: requests one replica runs at once (max_ongoing_requests); ``max_batch_units``:
    the largest request of the small lane (the model's max_batch_pixels).
    """

    model: str
    timeout_s: float
    replicas: int
    concurrency: int
    retry_after_s: int
    max_batch_units: int
    recent: dict[tuple[str, Lane], deque[float]] = field(default_factory=dict)  # seconds per unit
    lanes: dict[str, _LaneState] = field(
        default_factory=lambda: {"small": _LaneState(), "large": _LaneState()}
    )

    def __post_init__(self) -> None:
        self.replicas = max(1, self.replicas)

    @property
    def in_flight(self) -> int:
        return sum(lane.in_flight for lane in self.lanes.values())

    def admit(self, method: str, units: int) -> Ticket:
        """A ticket, or LimitExceededError (413) for a request the timeout cannot hold even alone,
        or OverloadedError (503) when the queue ahead of it would make it late."""
        lane_name = lane_for(units, self.max_batch_units)
        lane = self.lanes[lane_name]
        other: Lane = "large" if lane_name == "small" else "small"
        rates = self.recent.get((method, lane_name)) or self.recent.get((method, other))
        if not rates:
            if self.in_flight >= self.replicas * self.concurrency:
                raise self._overloaded(
                    self.retry_after_s, "no service time measured yet and every slot is busy"
                )
            estimate = 0.0
        else:
            typical = units * statistics.median(rates)
            if lane_name == "large" and typical >= self.timeout_s:
                raise LimitExceededError(
                    f"{self.model} would need about {typical:.0f} s for this request ({units:,} pixels at "
                    f"the measured {statistics.median(rates) * 1e6:.3g} us per pixel); the request timeout "
                    f"is {self.timeout_s:g} s: send a smaller input, or split it into several requests",
                    param="body",
                )
            estimate = units * max(rates)
            wait = lane.outstanding_s / self.replicas
            budget = HEADROOM * self.timeout_s
            if lane.in_flight and wait + estimate > budget:
                retry = max(self.retry_after_s, math.ceil(wait + estimate - budget))
                raise self._overloaded(
                    retry,
                    f"the queue ahead needs about {wait:.1f} s and this request {estimate:.1f} s; "
                    f"requests must finish well within the {self.timeout_s:g} s timeout",
                )
        ticket = Ticket(method, units, estimate, lane_name, alone=lane.in_flight == 0)
        lane.in_flight += 1
        lane.outstanding_s += estimate
        return ticket

    def release(self, ticket: Ticket, lane_s: float | None, *, timed_out: bool = False) -> None:
        """The request is answered; ``lane_s`` (the lane seconds the replica reported for its model
        work, ``serving.jobs.ModelTime``) updates the rate of its method and lane. A request that
        ran out of its timeout (``timed_out``) needed at least the timeout: that counts only for a
        large request with nothing ahead of it (a small one may have waited for a batch, and its
        units are the quantum's)."""
        lane = self.lanes[ticket.lane]
        lane.in_flight -= 1
        lane.outstanding_s = max(0.0, lane.outstanding_s - ticket.estimate_s)
        if timed_out:
            lane_s = self.timeout_s if ticket.lane == "large" and ticket.alone else None
        if lane_s:
            key = (ticket.method, ticket.lane)
            self.recent.setdefault(key, deque(maxlen=RECENT)).append(lane_s / ticket.units)

    def _overloaded(self, retry_after: int, why: str) -> OverloadedError:
        return OverloadedError(
            f"{self.model} cannot serve this request in time ({why}); retry after {retry_after} s",
            param="model",
            retry_after=retry_after,
        )
