"""serving.admission without a server: what is admitted, what is shed at once, and when to retry;
the two lanes and the up-front refusal of what the timeout cannot hold. Pure bookkeeping, no Ray."""

from __future__ import annotations

import math

import pytest

from serving.admission import HEADROOM, Admission
from tokenizers_svc.errors import LimitExceededError, OverloadedError

SMALL = 10_000  # max_batch_units of the tests above the lanes': every request there fits one batch


def test_before_any_measurement_only_the_replicas_slots_are_admitted():
    admission = Admission(
        "m", timeout_s=10, replicas=2, concurrency=1, retry_after_s=3, max_batch_units=SMALL
    )
    tickets = [admission.admit("encode", 100), admission.admit("encode", 100)]
    with pytest.raises(OverloadedError):
        admission.admit("encode", 100)
    admission.release(tickets[0], lane_s=None)
    admission.admit("encode", 100)  # a slot is free again


def test_a_request_the_queue_cannot_finish_in_time_is_shed_with_a_retry_after():
    admission = Admission(
        "m", timeout_s=10, replicas=1, concurrency=4, retry_after_s=1, max_batch_units=SMALL
    )
    admission.release(admission.admit("encode", 1000), lane_s=1.0)  # measured: 1 ms per unit
    first = admission.admit("encode", 5000)  # 5 s of work ahead
    with pytest.raises(OverloadedError) as info:
        admission.admit("encode", 5000)  # 5 s ahead + 5 s own > 7.5 s (HEADROOM of 10 s)
    assert info.value.retry_after == math.ceil(5 + 5 - HEADROOM * 10)  # when enough has drained
    admission.admit("encode", 2000)  # 5 + 2 s fits
    admission.release(first, lane_s=5.0)


def test_a_small_request_alone_is_always_admitted():
    admission = Admission("m", timeout_s=1, replicas=1, concurrency=1, retry_after_s=1, max_batch_units=SMALL)
    admission.release(admission.admit("decode", 10), lane_s=10.0)  # 1 s per unit
    ticket = admission.admit("decode", 1000)  # 1000 s estimated, but nothing is ahead of it
    assert ticket.estimate_s == pytest.approx(1000)


BATCH = 1_000_000  # max_batch_pixels: the small lane's largest request


def _admission(timeout_s: float = 60.0) -> Admission:
    return Admission("m", timeout_s, replicas=1, concurrency=16, retry_after_s=1, max_batch_units=BATCH)


def test_a_request_the_timeout_cannot_hold_is_refused_up_front_naming_estimate_and_limit():
    admission = _admission()
    ticket = admission.admit("decode", 4 * BATCH)  # no rate yet: admitted
    admission.release(ticket, lane_s=8.0)  # 2 us per pixel in the large lane
    with pytest.raises(
        LimitExceededError, match=r"about 64 s .*32,000,000 pixels.*timeout is 60 s"
    ) as caught:
        admission.admit("decode", 32 * BATCH)  # alone, on an idle server: it used to run to its 504
    assert caught.value.http_status == 413
    admission.release(admission.admit("decode", 20 * BATCH), lane_s=None)  # 40 s: fits, admitted


def test_a_large_request_that_timed_out_alone_prices_the_next_one_like_it():
    admission = _admission(timeout_s=10.0)
    admission.release(admission.admit("decode", 5 * BATCH), lane_s=None, timed_out=True)
    with pytest.raises(LimitExceededError):
        admission.admit("decode", 5 * BATCH)


def test_small_requests_are_never_too_large_and_their_timeouts_price_nothing():
    """A small request is priced at the batching quantum, and may have timed out waiting for a
    batch: its timeout says nothing about the next small request (every one would be refused)."""
    admission = _admission(timeout_s=8.0)
    admission.release(admission.admit("encode", BATCH), lane_s=None, timed_out=True)
    admission.release(admission.admit("encode", BATCH), lane_s=8.0)  # a whole batch took the timeout
    admission.release(admission.admit("encode", BATCH), lane_s=None)  # admitted, not a 413
    ahead = admission.admit("decode", 10 * BATCH)
    behind = admission.admit("decode", 10 * BATCH)
    admission.release(behind, lane_s=None, timed_out=True)  # it waited for the one ahead
    admission.release(ahead, lane_s=1.0)
    admission.release(admission.admit("decode", 10 * BATCH), lane_s=None)


def test_small_requests_do_not_queue_behind_a_large_one():
    admission = _admission()
    admission.release(admission.admit("encode", BATCH), lane_s=1.0)  # 1 us per pixel, small lane
    admission.release(admission.admit("encode", 10 * BATCH), lane_s=10.0)  # large lane
    large = admission.admit("encode", 40 * BATCH)  # 40 s of work in flight
    small = [admission.admit("encode", BATCH) for _ in range(10)]  # not counted behind the 40 s
    with pytest.raises(OverloadedError, match=r"the queue ahead needs about 40\.0 s"):
        admission.admit("encode", 10 * BATCH)  # a second large one would wait for the first
    for ticket in (large, *small):
        admission.release(ticket, lane_s=None)
    assert admission.in_flight == 0
    assert all(lane.outstanding_s == 0 for lane in admission.lanes.values())
