"""tokenizers_svc.client against a small real HTTP server (uvicorn on 127.0.0.1): retries honouring
Retry-After, typed errors, request encoding. The client against the real service is in test_serving.py."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tests.helpers import free_port
from tokenizers_svc import errors
from tokenizers_svc.client import AsyncClient, Client, RetryPolicy
from tokenizers_svc.latents import Latents
from tokenizers_svc.spec import LatentNormalization

LATENTS = Latents(
    latents=torch.arange(16, dtype=torch.float32).reshape(1, 4, 2, 2),
    tokenizer="stub",
    normalized=True,
    normalization=LatentNormalization(scale=0.5),
    original_size=(4, 4),
)


def _app(state: dict) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/models/{model}/encode")
    async def encode(model: str, request: Request):
        state["calls"] += 1
        state["last"] = (
            dict(request.query_params),
            request.headers.get("content-type"),
            await request.body(),
        )
        if model == "busy" and state["calls"] <= 2:
            return JSONResponse(
                {"error": {"type": "overloaded", "message": "full", "param": "model"}},
                status_code=503,
                headers={"retry-after": "0"},
            )
        if model == "big":
            return JSONResponse(
                {"error": {"type": "limit_exceeded", "message": "too big", "param": "body"}}, 413
            )
        if model == "missing":
            return JSONResponse(
                {"error": {"type": "unsupported_model", "message": "no", "param": "model"}}, 404
            )
        return Response(LATENTS.to_bytes(), media_type="application/x-safetensors")

    return app


@pytest.fixture(scope="module")
def server():
    state = {"calls": 0}
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(_app(state), host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", state
    srv.should_exit = True
    thread.join(timeout=10)


def test_retry_policy_prefers_retry_after():
    policy = RetryPolicy(backoff_s=0.5, max_wait_s=10)
    assert policy.wait(0, "3") == 3.0 and policy.wait(5, "100") == 10.0
    assert policy.wait(0, None) == 0.5 and policy.wait(2, None) == 2.0 and policy.wait(1, "soon") == 1.0


def test_sync_retries_overloaded_then_succeeds(server):
    url, state = server
    state["calls"] = 0
    with Client(url) as client:
        latents = client.encode("busy", b"\x89PNG fake")
    assert state["calls"] == 3
    torch.testing.assert_close(latents.latents, LATENTS.latents)


def test_gives_up_after_max_retries(server):
    url, state = server
    state["calls"] = 0
    with Client(url, retry=RetryPolicy(max_retries=1)) as client, pytest.raises(errors.OverloadedError):
        client.encode("busy", b"x")
    assert state["calls"] == 2


def test_typed_errors_and_tensor_bodies(server):
    url, state = server
    with Client(url) as client:
        with pytest.raises(errors.LimitExceededError):
            client.encode("big", b"x")
        with pytest.raises(errors.UnsupportedModelError):
            client.encode("missing", b"x")
        client.encode("ok", torch.zeros(1, 3, 4, 4, dtype=torch.uint8), normalize=False)
    params, content_type, body = state["last"]
    assert params == {"normalize": "false", "shape": "1,3,4,4", "dtype": "uint8"}
    assert content_type == "tensor/binary" and len(body) == 48


def test_async_client(server):
    url, state = server
    state["calls"] = 0

    async def run():
        async with AsyncClient(url) as client:
            return await asyncio.gather(client.encode("busy", b"a"), client.encode("ok", b"b"))

    results = asyncio.run(run())
    assert all(r.tokenizer == "stub" for r in results)
