"""Joining or starting Ray the same way in every entry point (serve, the batch job, the sharded
evaluation), with a clear word on token auth.

Ray clusters use token authentication by default: ``ray start`` and a local ``ray.init()`` keep the
token in ``~/.ray/auth_token``. ``ray.init()`` sends it by itself when it starts the cluster or finds
a local one (``ray start`` on this machine); given an explicit address (``--address``,
``RAY_ADDRESS``) it sends it only when ``RAY_AUTH_MODE=token`` is exported, deliberately (a token is
not sent to any address a variable names), and the cluster refuses the client with
``InvalidAuthToken`` (after retrying for about 20 s, as a ConnectionError). That refusal becomes a
ConfigError here that says what to export. Ray's own
CLIs (``serve run``, ``serve status``, ``ray job submit``) need the same: docs/serving.md and
docs/batch.md say so where they are first used.
"""

from __future__ import annotations

import ray
from ray.exceptions import AuthenticationError

from tokenizers_svc.errors import ConfigError


def _refused_for_token(exc: BaseException | None) -> bool:
    """Ray reports a missing token as a ConnectionError caused by a RuntimeError whose text holds
    the AuthenticationError (InvalidAuthToken); look down the chain."""
    while exc is not None:
        if isinstance(exc, AuthenticationError) or "InvalidAuthToken" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def init_ray(**kwargs) -> None:
    """``ray.init(**kwargs)``; a cluster's refusal for want of a token is a ConfigError with the fix."""
    try:
        ray.init(**kwargs)
    except (AuthenticationError, ConnectionError) as exc:
        if not _refused_for_token(exc):
            raise
        raise ConfigError(
            f"the Ray cluster refused this client (InvalidAuthToken: {exc}); it uses token "
            "authentication: export RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token "
            "(or RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN)",
            param="address",
        ) from None
