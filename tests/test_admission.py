"""serving.admission without a server: what is admitted, what is shed at once, and when to retry."""

from __future__ import annotations

import math

import pytest

from serving.admission import HEADROOM, Admission
from tokenizers_svc.errors import OverloadedError


def test_before_any_measurement_only_the_replicas_slots_are_admitted():
    admission = Admission("m", timeout_s=10, replicas=2, concurrency=1, retry_after_s=3)
    tickets = [admission.admit("encode", 100), admission.admit("encode", 100)]
    with pytest.raises(OverloadedError):
        admission.admit("encode", 100)
    admission.release(tickets[0], compute_s=None)
    admission.admit("encode", 100)  # a slot is free again


def test_a_request_the_queue_cannot_finish_in_time_is_shed_with_a_retry_after():
    admission = Admission("m", timeout_s=10, replicas=1, concurrency=4, retry_after_s=1)
    admission.release(admission.admit("encode", 1000), compute_s=1.0)  # measured: 1 ms per unit
    first = admission.admit("encode", 5000)  # 5 s of work ahead
    with pytest.raises(OverloadedError) as info:
        admission.admit("encode", 5000)  # 5 s ahead + 5 s own > 7.5 s (HEADROOM of 10 s)
    assert info.value.retry_after == math.ceil(5 + 5 - HEADROOM * 10)  # when enough has drained
    admission.admit("encode", 2000)  # 5 + 2 s fits
    admission.release(first, compute_s=5.0)


def test_a_request_alone_is_always_admitted():
    admission = Admission("m", timeout_s=1, replicas=1, concurrency=1, retry_after_s=1)
    admission.release(admission.admit("decode", 10), compute_s=10.0)  # 1 s per unit
    ticket = admission.admit("decode", 1000)  # 1000 s estimated, but nothing is ahead of it
    assert ticket.estimate_s == pytest.approx(1000)
