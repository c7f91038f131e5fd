"""Joining or starting Ray the same way in every entry point (serve, the batch job, the sharded
evaluation): quiet, with the dashboard off unless a port is asked for, and a clear word on token auth.

Ray clusters use token authentication by default: ``ray start`` and a local ``ray.init()`` keep the
token in ``~/.ray/auth_token``. ``ray.init()`` sends it by itself when it starts the cluster or finds
a local one (``ray start`` on this machine); given an explicit address (``--address``,
``RAY_ADDRESS``) it sends it only when ``RAY_AUTH_MODE=token`` is exported, deliberately (a token is
not sent to any address a variable names), and the cluster refuses the client with
``InvalidAuthToken`` (after retrying for about 20 s, as a ConnectionError). That refusal becomes a
ConfigError here that says what to export. Ray's own
CLIs (``serve run``, ``serve status``, ``ray job submit``) need the same: docs/serving.md and
docs/batch.md say so where they are first used.

Quiet: Ray 2.60 prints a token-authentication banner whenever it turns token auth on by itself,
that is when ``RAY_AUTH_MODE`` is unset and it starts a local instance (or finds one and holds a
token). :func:`init_ray` sets ``RAY_AUTH_MODE=token`` in exactly those cases, so the cluster is the
same (token auth on, the same token file) and the banner is not printed; an explicit address is
left to the user's setting, as Ray leaves it.
"""

from __future__ import annotations

import logging
import os
import sys

import ray
from ray.exceptions import AuthenticationError

from tokenizers_svc.errors import ConfigError

AUTH_MODE_VARIABLE = "RAY_AUTH_MODE"


def _refused_for_token(exc: BaseException | None) -> bool:
    """Ray reports a missing token as a ConnectionError caused by a RuntimeError whose text holds
    the AuthenticationError (InvalidAuthToken); look down the chain."""
    while exc is not None:
        if isinstance(exc, AuthenticationError) or "InvalidAuthToken" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def starts_local_instance(address: str | None) -> bool:
    """Whether ``ray.init(address=address)`` starts a new local Ray instance (no cluster named by
    ``address`` or ``RAY_ADDRESS``, none found on this machine by ``ray start``'s address file)."""
    from ray._private.services import canonicalize_bootstrap_address

    if address == "local":
        return True
    if address not in (None, "auto"):
        return False
    try:
        return canonicalize_bootstrap_address(address) is None
    except ConnectionError:  # "auto" and nothing running: ray.init fails the same way
        return False


def _turn_on_token_auth_quietly(address: str | None) -> None:
    """Set RAY_AUTH_MODE=token where Ray would turn token auth on by itself and print its banner:
    a local instance started here, or one found on this machine while a token exists."""
    if os.environ.get(AUTH_MODE_VARIABLE) is not None:
        return  # the user's choice, respected as Ray respects it
    from ray._raylet import AuthenticationTokenLoader, Config

    if starts_local_instance(address):
        enable = True
    else:
        found_here = address in (None, "auto") and not os.environ.get("RAY_ADDRESS")
        enable = found_here and AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)
    if enable:
        os.environ[AUTH_MODE_VARIABLE] = "token"  # inherited by the workers this process starts
        Config.initialize("")  # Ray caches its config at import; reread it (what Ray itself does here)


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    dashboard_port: int | None = None,
    verbose: bool = True,
    log_to_driver: bool = True,
    announce: str | None = None,
) -> None:
    """``ray.init`` for every entry point; a cluster's refusal for want of a token is a ConfigError
    with the fix.

    ``dashboard_port``: start the dashboard on 127.0.0.1 at that port (a local instance only); off
    by default, so several local instances (two servers, a batch job) share a machine without a
    port collision. ``verbose=False`` keeps Ray's INFO lines out of the terminal (they stay in the
    session's log files, :func:`logs_dir`). ``announce``: a prefix such as ``"tokenizers-svc
    serve"``; a line saying what starts is printed to stderr before Ray takes its 5-15 s.
    """
    local = starts_local_instance(address)
    if announce:
        if local:
            dashboard = f"dashboard on 127.0.0.1:{dashboard_port}" if dashboard_port else "dashboard off"
            where = f"starting a local Ray instance ({dashboard})"
        else:
            named = address if address not in (None, "auto") else os.environ.get("RAY_ADDRESS")
            where = (
                f"joining the Ray cluster at {named}"
                if named
                else "joining the Ray cluster `ray start` started here"
            )
        print(f"{announce}: {where}", file=sys.stderr, flush=True)
    _turn_on_token_auth_quietly(address)
    options: dict = {"address": address, "log_to_driver": log_to_driver}
    if local:
        options.update(num_cpus=num_cpus, include_dashboard=dashboard_port is not None)
        if dashboard_port is not None:
            options.update(dashboard_host="127.0.0.1", dashboard_port=dashboard_port)
    if not verbose:
        options["logging_level"] = logging.WARNING
    try:
        ray.init(**options)
    except (AuthenticationError, ConnectionError) as exc:
        if not _refused_for_token(exc):
            raise
        raise ConfigError(
            f"the Ray cluster refused this client (InvalidAuthToken: {exc}); it uses token "
            "authentication: export RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token "
            "(or RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN)",
            param="address",
        ) from None


def started_here() -> bool:
    """Whether this process started the Ray instance it is connected to (a local one: its nodes
    live and die with this process), rather than joining a cluster."""
    return bool(getattr(ray._private.worker._global_node, "head", False))


def cluster_is_this_machine(address: str | None) -> bool:
    """Whether the job's Ray is this machine alone: the instance this process is connected to has
    one node, this one; or, not connected yet, ``ray.init(address=address)`` would start a local
    instance (no cluster named by ``address`` or ``RAY_ADDRESS``, no ``ray start`` on this machine)."""
    if ray.is_initialized():
        nodes = [node for node in ray.nodes() if node["Alive"]]
        return len(nodes) == 1 and nodes[0]["NodeID"] == ray.get_runtime_context().get_node_id()
    return starts_local_instance(address)


def logs_dir() -> str:
    """The log directory of the Ray session this process is connected to (Ray writes every
    process's log there; serve's replicas under ``serve/``)."""
    return ray._private.worker._global_node.get_logs_dir_path()
