"""The deployment files under deploy/: `ray up` launcher configs validated against the
JSON schema Ray ships (and Ray's own config preparation), KubeRay manifests checked
for structure and for agreeing with raymoe (import path, CLI entry point, shipped
configs, GPU counts)."""

from __future__ import annotations

import json
import pathlib
import shlex

import jsonschema
import pytest
import yaml

from raymoe.cluster.layout import RankLayout

REPO = pathlib.Path(__file__).resolve().parents[2]
LAUNCHERS = sorted((REPO / "deploy" / "cluster").glob("*.yaml"))
KUBERAY = sorted((REPO / "deploy" / "kuberay").glob("*.yaml"))
MULTICAST_OFF = ("NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "NVSHMEM_DISABLE_NVLS=1")


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((pathlib.Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_there_are_launchers_and_manifests():
    assert len(LAUNCHERS) >= 2 and {"RayService", "RayJob"} <= {yaml.safe_load(p.read_text())["kind"] for p in KUBERAY}


@pytest.mark.parametrize("path", LAUNCHERS, ids=[p.name for p in LAUNCHERS])
def test_launcher_config_is_valid_for_ray_up(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, _ray_schema())
    validate_config(prepare_config(config))  # what `ray up` runs: defaults filled, cross-field checks

    docker = config["docker"]
    assert "gpu" in docker["image"], "GPU nodes need Ray's GPU image"
    options = " ".join(docker["run_options"])
    assert all(v in options for v in MULTICAST_OFF), "NVLink multicast must be off in every container"
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "raymoe-" in setup and "[gpu]" in setup, "setup must install the raymoe wheel"
    assert config["file_mounts"], "the wheel travels as a file mount"
    if config["provider"]["type"] != "local":
        types = config["available_node_types"]
        assert config["head_node_type"] in types
        workers = [t for t in types if t != config["head_node_type"]]
        assert workers and all(types[t].get("min_workers", 0) >= 1 for t in workers), "a GPU worker type"


def _manifest(kind: str) -> dict:
    (doc,) = [d for d in (yaml.safe_load(p.read_text()) for p in KUBERAY) if d["kind"] == kind]
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    return doc


def _check_cluster(spec: dict, world_size: int) -> None:
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = spec["workerGroupSpecs"]
    gpus = 0
    for g in groups:
        assert g["groupName"] and g["replicas"] >= 1 and "rayStartParams" in g
        (container,) = g["template"]["spec"]["containers"]
        assert container["image"] == head["template"]["spec"]["containers"][0]["image"]
        limit = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert limit == int(container["resources"]["requests"]["nvidia.com/gpu"])
        gpus += g["replicas"] * limit
    assert gpus == world_size, f"the workers offer {gpus} GPUs, the config's layout needs {world_size}"


def test_rayservice_points_at_the_app_builder():
    from raymoe.cluster.config import resolve_config

    doc = _manifest("RayService")
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(__import__(module, fromlist=[attr]), attr)
    assert builder.__name__ == "build_app" and module == "raymoe.deploy.serve_app"
    assert set(app["args"]) <= {"config", "overrides"}
    config = resolve_config(app["args"]["config"])
    assert config.parallel.device == "cuda"
    assert serve_config["http_options"]["host"] == "0.0.0.0"
    _check_cluster(doc["spec"]["rayClusterConfig"], RankLayout.from_config(config.parallel).world_size)


def test_rayjob_runs_the_installed_cli():
    from raymoe.cluster.config import resolve_config
    from raymoe.deploy.cli import build_parser

    doc = _manifest("RayJob")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "raymoe" and "working_dir" not in json.dumps(doc)
    args = build_parser().parse_args(argv[1:])
    config = resolve_config(args.config)
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    _check_cluster(doc["spec"]["rayClusterSpec"], RankLayout.from_config(config.parallel).world_size)


def test_build_app_rejects_unknown_arguments():
    from raymoe.deploy.serve_app import build_app

    with pytest.raises(ValueError, match="unknown argument"):
        build_app({"config": "tiny", "replicas": 2})
    with pytest.raises(ValueError, match="neither a file nor a shipped config"):
        build_app({"config": "no-such-config"})
