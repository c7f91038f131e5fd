"""The deployment examples (issue 22 item 5), checked without a cluster: the local config, the GPU
config in `serve build` form and the KubeRay RayService pass Ray's schema (ServeDeploySchema) and
the project's (ServiceConfig), and mistakes in them are refused. tests/test_cluster.py checks on
Ray nodes with stand-in GPUs that the GPU options reach the actors."""

from __future__ import annotations

import pytest
import ray
import yaml

from tests.helpers import REPO


def _gpu_config() -> dict:
    return yaml.safe_load((REPO / "serving" / "config.gpu.yaml").read_text())


def test_deployment_configs_pass_rays_schema_and_ours():
    """The local config, the GPU config (serve build form) and the KubeRay RayService's
    serveConfigV2 all pass Ray's ServeDeploySchema and the project's ServiceConfig; the GPU
    deployments ask for GPUs and autoscale; the RayService serves the GPU config's application."""
    from serving.app import check_serve_config, rendered_deployments

    check_serve_config(yaml.safe_load((REPO / "serving" / "config.yaml").read_text()))
    gpu = _gpu_config()
    config = check_serve_config(gpu)
    assert {m.dtype for m in config.models} == {"auto"} and all(m.device == "cuda" for m in config.models)
    rendered = rendered_deployments(gpu["applications"][0]["args"])
    for model in config.models:
        deployment = rendered[f"tokenizer-{model.name}"]
        assert deployment["ray_actor_options"]["num_gpus"] == model.num_gpus > 0
        assert deployment["autoscaling_config"]["max_replicas"] == model.autoscaling.max_replicas
    assert [d["name"] for d in gpu["applications"][0]["deployments"]] == list(rendered)

    service = yaml.safe_load((REPO / "docs" / "kuberay" / "rayservice.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    check_serve_config(serve_config, "serveConfigV2")
    assert serve_config["applications"] == gpu["applications"]
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    gpus = [
        int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in cluster["workerGroupSpecs"]
    ]
    assert all(n >= max(m.num_gpus for m in config.models) for n in gpus)
    # every node runs Serve's HAProxy ingress, as tokenizers-svc serve does on a local instance
    from serving.app import HAPROXY_ENVIRONMENT

    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        env = {e["name"]: e["value"] for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == HAPROXY_ENVIRONMENT["RAY_SERVE_ENABLE_HA_PROXY"]
        assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == HAPROXY_ENVIRONMENT["RAY_SERVE_THROUGHPUT_OPTIMIZED"]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda app: app["deployments"][0]["ray_actor_options"].update(num_gpus=1), "ray_actor_options"),
        (lambda app: app["deployments"][0].update(name="tokenizer-typo"), "tokenizer-typo"),
        (lambda app: app["args"]["models"][0].update(num_gpus=0), "num_gpus"),
        (lambda app: app["deployments"][0].update(num_replicas="two"), "not a valid Ray Serve config"),
    ],
)
def test_deployment_config_mistakes_are_refused(change, named):
    """An override that differs from what args make, a deployment the app does not make, a cuda
    model without GPUs, a value Ray's schema refuses: each a ConfigError naming it."""
    from serving.app import check_serve_config
    from tokenizers_svc.errors import ConfigError

    gpu = _gpu_config()
    change(gpu["applications"][0])
    with pytest.raises(ConfigError, match=named):
        check_serve_config(gpu)
