"""tokenizers_svc.abandon: when a work token counts as abandoned, and where checkpoint() raises."""

from __future__ import annotations

import asyncio
import time

import pytest

from tokenizers_svc import abandon
from tokenizers_svc.errors import RequestTimeoutError


def test_a_token_is_abandoned_by_its_deadline_or_a_cancel():
    assert abandon.WorkToken(deadline=time.time() - 1).abandoned
    assert not abandon.WorkToken(deadline=time.time() + 60).abandoned
    assert not abandon.WorkToken().abandoned
    token = abandon.WorkToken()
    token.cancel()
    assert token.abandoned


def test_a_batch_token_is_abandoned_only_when_every_request_is():
    first, second = abandon.WorkToken(), abandon.WorkToken()
    batch = abandon.WorkToken(parts=(first, second))
    first.cancel()
    assert not batch.abandoned
    second.cancel()
    assert batch.abandoned


def test_checkpoint_raises_only_inside_an_abandoned_scope():
    abandon.checkpoint()  # no scope: the CLI, the batch job and the library never stop
    token = abandon.WorkToken()
    with abandon.scope(token):
        abandon.checkpoint()
        token.cancel()
        with pytest.raises(RequestTimeoutError):
            abandon.checkpoint()
    abandon.checkpoint()  # the scope is gone with its block


def test_a_failure_inside_the_scope_cancels_its_token():
    token = abandon.WorkToken()
    with pytest.raises(ValueError), abandon.scope(token):
        raise ValueError("the request failed")
    assert token.abandoned


def test_the_token_follows_work_into_a_thread():
    """The server runs a request's work with asyncio.to_thread; the thread sees the request's token."""
    token = abandon.WorkToken()

    async def request() -> None:
        with abandon.scope(token):
            token.cancel()
            await asyncio.to_thread(abandon.checkpoint)

    with pytest.raises(RequestTimeoutError):
        asyncio.run(request())
