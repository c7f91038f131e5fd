"""The ASGI middleware over real HTTP (uvicorn on 127.0.0.1, no Ray): API key, body cap, 500 shape."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from serving.metrics import ServiceMetrics
from serving.middleware import MiddlewareSettings, ServiceMiddleware
from tests.helpers import free_port

KEY = "s3cret-key"
CAP = 10_000
BODY_TIMEOUT_S = 1.0


def _app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(ServiceMiddleware)
    app.state.middleware = MiddlewareSettings(
        max_body_bytes=CAP, body_timeout_s=BODY_TIMEOUT_S, api_key=KEY, metrics=ServiceMetrics()
    )

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"size": len(await request.body())}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("secret internal detail at /srv/app/model.py")

    return app


@pytest.fixture(scope="module")
def base_url():
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_app(), host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


AUTH = {"authorization": f"Bearer {KEY}"}


def test_api_key(base_url):
    assert httpx.get(f"{base_url}/healthz").status_code == 200  # open without a key
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
        response = httpx.post(f"{base_url}/echo", content=b"x", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["x-request-id"]
    assert httpx.post(f"{base_url}/echo", content=b"abc", headers=AUTH).json() == {"size": 3}


def test_body_cap_declared_and_chunked(base_url):
    response = httpx.post(f"{base_url}/echo", content=b"x" * (CAP + 1), headers=AUTH)
    assert response.status_code == 413 and response.json()["error"]["param"] == "body"

    def chunks():
        for _ in range(50):
            yield b"y" * 1000

    response = httpx.post(f"{base_url}/echo", content=chunks(), headers=AUTH)
    assert response.status_code == 413 and "chunked" in response.json()["error"]["message"]
    assert httpx.post(f"{base_url}/echo", content=b"x" * CAP, headers=AUTH).json() == {"size": CAP}


def trickle(base_url: str, declared: int, sent: bytes) -> tuple[bytes, bytes]:
    """POST /echo declaring ``declared`` bytes, send ``sent`` and stall: (the answer, what the
    server sends after it: b"" once it has closed the connection)."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = f"POST /echo HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-length: {declared}\r\n\r\n"
        sock.sendall(head.encode() + sent)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer, sock.recv(65536)


def test_a_body_not_complete_within_the_deadline_is_408_and_the_connection_is_freed(base_url):
    """Issue 27 item 7: an upload trickled over 90 s was accepted. Now the body must arrive within
    body_timeout_s; the 408 closes the connection; other clients are served meanwhile."""
    answer, after = trickle(base_url, 1000, b"x" * 10)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
    error = httpx.Response(408, content=body).json()["error"]
    assert error["type"] == "body_timeout" and error["param"] == "body" and "within 1 s" in error["message"]
    assert after == b""  # the server closed the connection
    assert httpx.post(f"{base_url}/echo", content=b"abc", headers=AUTH).json() == {"size": 3}


def test_unknown_exception_is_a_generic_500(base_url):
    response = httpx.get(f"{base_url}/boom", headers={**AUTH, "x-request-id": "abc123"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "internal_error" and "abc123" in error["message"]
    assert (
        "secret" not in response.text and "/srv" not in response.text and "RuntimeError" not in response.text
    )
    assert httpx.get(f"{base_url}/healthz").status_code == 200


def test_default_config_file_parses_and_bad_config_is_refused():
    from serving.app import DEFAULT_CONFIG, load_config_file
    from serving.schemas import parse_config
    from tokenizers_svc.defaults import DEFAULT_MODELS
    from tokenizers_svc.errors import ConfigError

    config = parse_config(load_config_file(DEFAULT_CONFIG)["args"])
    served = [m.name for m in config.models]
    assert served[:2] == [DEFAULT_MODELS["image"], DEFAULT_MODELS["video"]], served  # make serve: defaults
    assert sum(m.num_cpus for m in config.models) <= 2  # every replica fits a 2-core machine
    with pytest.raises(ConfigError, match="max_batch_size"):
        parse_config({"models": [{"name": "sd-vae-tiny", "max_batch_size": 0}]})
    with pytest.raises(ConfigError, match="typo_key"):
        parse_config({"models": [{"name": "sd-vae-tiny"}], "typo_key": 1})
