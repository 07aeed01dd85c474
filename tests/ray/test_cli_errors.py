"""The ``raymoe`` command's one-line errors for mistakes found only once Ray runs: one a rank
actor raises (Ray wraps it in a traceback), a layout that a Ray started here cannot hold
(nothing can join it: refused at once, not after the placement timeout), and one the engine
host's Serve replica raises (its own message at the first failure, not Serve's after its retries)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest
from ports import free_ports
from ray import serve

from raymoe.cluster.config import load_config
from raymoe.deploy.cli import main
from raymoe.deploy.serve_app import APP_NAME, AlreadyServingError, start_serving, stop_serving


def test_a_mistake_an_actor_raises_is_one_line(ray_cluster, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"], "model_type": "x"}))
    assert main(["generate", "--model", str(tmp_path)]) == 2
    # Ray's own log lines reach the driver's stderr too (a raylet's disk warnings)
    err = "".join(line for line in capsys.readouterr().err.splitlines(True) if "(raylet)" not in line)
    assert err.startswith("raymoe generate: error: ") and err.count("\n") == 1, err
    assert "NoSuchForCausalLM" in err and "Traceback" not in err


def test_a_layout_a_local_ray_cannot_hold_is_refused_at_once(tmp_path):
    config = tmp_path / "two-nodes.yaml"
    config.write_text("parallel:\n  dp: 2\n  ep: 2\n  nodes: 2\n  placement_timeout_s: 600\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
    done = subprocess.run(  # within far less than the 600 s placement timeout
        [sys.executable, "-m", "raymoe.deploy.cli", "generate", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("raymoe generate: error: parallel: the Ray started here cannot hold this layout")
    assert "2 node(s)" in last


def test_a_second_serve_on_one_cluster_is_refused_and_the_first_goes_on(ray_cluster):
    first = start_serving(load_config().replace({"serve.port": free_ports(1)[0]}))
    try:
        with pytest.raises(AlreadyServingError, match="already runs"):
            start_serving(load_config().replace({"serve.port": free_ports(1)[0]}))
        with urllib.request.urlopen(first + "/health", timeout=30) as answer:
            assert answer.status == 200
    finally:
        stop_serving()


def test_serve_raises_the_mistake_the_engine_host_raises(ray_cluster, tmp_path):
    # a cluster already running (as a remote one): nothing is checked before deploying, and
    # the engine host's replica raises while loading the model
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"], "model_type": "x"}))
    config = load_config().replace({"model.path": str(tmp_path), "serve.port": free_ports(1)[0]})
    try:
        # Serve's own error after its retries is a RuntimeError naming only the deployment
        with pytest.raises(ValueError, match="architecture 'NoSuchForCausalLM' is not supported") as raised:
            start_serving(config)
        assert "Traceback" not in str(raised.value)
        assert APP_NAME not in serve.status().applications  # not left retrying
    finally:
        stop_serving()
