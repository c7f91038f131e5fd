"""Build the Ray Serve application from a config, and ``tokenizers-svc serve`` (local Ray, 127.0.0.1).

``serving/config.yaml`` is a Ray Serve config file whose ``args`` are a :class:`ServiceConfig`, so
one file works three ways: ``tokenizers-svc serve --config serving/config.yaml`` (starts a local Ray
instance), ``serve run serving/config.yaml`` and ``serve deploy serving/config.yaml`` (existing cluster).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import threading
from pathlib import Path

import ray
import yaml
from ray import serve
from ray.serve import Application

from serving.routes import Ingress
from serving.schemas import ModelConfig, ServiceConfig, parse_config
from serving.worker import TokenizerWorker
from tokenizers_svc.errors import EXIT_OK, ConfigError, TokenizerError, print_error
from tokenizers_svc.ray_cluster import init_ray
from tokenizers_svc.registry import get_preset

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")


def _deployment_name(model: str) -> str:
    return "tokenizer-" + re.sub(r"[^A-Za-z0-9_-]+", "-", model)


def _worker(model: ModelConfig, config: ServiceConfig):
    options: dict = {
        "name": _deployment_name(model.name),
        "ray_actor_options": {"num_cpus": model.num_cpus, "num_gpus": model.num_gpus},
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
    workers = {model.name: _worker(model, config) for model in config.models}
    return Ingress.bind(config.model_dump(), workers)


def load_config_file(path: str | Path) -> dict:
    """The Serve config file -> {"http_options": ..., "args": ...} of its first application."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read service config {path}: {exc}", param="config") from None
    apps = (document or {}).get("applications") or []
    if not apps or "args" not in apps[0]:
        raise ConfigError(f"{path} must hold applications[0].args (a Serve config file)", param="config")
    return {"http_options": document.get("http_options") or {}, "args": apps[0]["args"]}


def main(argv: list[str] | None = None) -> int:
    """Start local Ray + the app on 127.0.0.1 and block until Ctrl-C / SIGTERM."""
    parser = argparse.ArgumentParser(prog="tokenizers-svc serve", description=__doc__)
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="Serve config file (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=None, help="HTTP port (default: config http_options.port)"
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray instance")
    args = parser.parse_args(argv)
    try:
        loaded = load_config_file(args.config)
        app = build_app(loaded["args"])
    except TokenizerError as error:
        return print_error(error)
    port = args.port or int(loaded["http_options"].get("port", 8000))
    try:
        init_ray(num_cpus=args.num_cpus, include_dashboard=False)
    except TokenizerError as error:
        return print_error(error)
    # Installed before Serve starts (and after ray.init, which installs its own): a SIGTERM while the
    # replicas come up then stops the service cleanly instead of reaching Ray's handler, which aborts.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name="tokenizers", route_prefix="/", blocking=False)
    print(f"tokenizers-svc listening on http://127.0.0.1:{port} (docs at /docs); Ctrl-C to stop", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    serve.shutdown()
    ray.shutdown()
    return EXIT_OK
