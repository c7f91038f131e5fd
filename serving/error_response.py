"""The one rendering of an error as HTTP: ``{"error": {"type", "message", "param"}}``.

Every non-2xx answer goes through :func:`error_response`: the routes' exception handlers, the
ASGI middleware's refusals (auth, body cap, the generic 500) and a replica's error reply, so the
shape, the content type and ``Retry-After`` are the same wherever the error came from.
"""

from __future__ import annotations

import json

from starlette.responses import Response

from tokenizers_svc.errors import TokenizerError


def error_response(error: TokenizerError) -> Response:
    """The error's status and JSON body; a 503 also says when to retry (``Retry-After``, whole
    seconds, at least 1)."""
    headers = {}
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        headers["retry-after"] = str(max(1, round(retry_after)))
    body = json.dumps({"error": error.to_dict()}).encode()
    return Response(body, status_code=error.http_status, headers=headers, media_type="application/json")
