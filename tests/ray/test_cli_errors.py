"""The ``raymoe`` command's one-line errors for mistakes found only once Ray runs: one a rank
actor raises (Ray wraps it in a traceback), a layout that a Ray started here cannot hold
(nothing can join it: refused at once, not after the placement timeout), and one the engine
host's Serve replica raises (its own message at the first failure, not Serve's after its retries);
and a stop (SIGINT, SIGTERM) while ``raymoe serve`` starts: one line, not a traceback or Ray's
stack dump."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import ray
from ports import free_ports
from ray import serve

from raymoe.cluster.config import load_config
from raymoe.deploy.cli import main
from raymoe.deploy.serve_app import APP_NAME, CONTROLLER_PREFIX, AlreadyServingError, start_serving, stop_serving


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


def _serve_and_raymoe_actors() -> list[str]:
    """The named actors of Serve and of raymoe's controllers (which live in their job's namespace)."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return [a["name"] for a in named if a["namespace"] == "serve" or a["name"].startswith(CONTROLLER_PREFIX)]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_serve_starts_is_one_line_and_cleans_up(ray_cluster, tmp_path, signum):
    # a layout the cluster cannot place yet: the engine host waits for it (as for an autoscaler)
    config = tmp_path / "big.yaml"
    config.write_text("parallel:\n  dp: 8\n  ep: 8\n  placement_timeout_s: 600\n")
    argv = ["serve", "--config", str(config), "--address", ray_cluster.address, "--port", str(free_ports(1)[0])]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "stderr"
    with log.open("w") as stderr:  # a file: Ray's log lines would fill a pipe nobody reads meanwhile
        server = subprocess.Popen([sys.executable, "-m", "raymoe.deploy.cli", *argv], env=env, stderr=stderr)
    # Serve is looked at through its actors, not serve.status(): this driver's Serve client would
    # keep the controller that the server shuts down
    try:
        deadline = time.monotonic() + 120
        while not any(n.startswith(CONTROLLER_PREFIX) for n in _serve_and_raymoe_actors()):  # the engine starts
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        server.send_signal(signum)
        server.wait(timeout=120)
    finally:
        server.kill()
    err = log.read_text()
    assert server.returncode == 128 + signum, err[-2000:]
    ours = [line for line in err.strip().splitlines() if "(raylet)" not in line]  # Ray's own log lines reach it too
    assert ours[-1] == f"raymoe serve: interrupted by {signum.name}; stopped"
    assert "Traceback" not in err and "received at time" not in err, err[-2000:]  # nor Ray's stack dump
    deadline = time.monotonic() + 60
    while _serve_and_raymoe_actors():  # Serve shut down, as after a stop once serving
        assert time.monotonic() < deadline, _serve_and_raymoe_actors()
        time.sleep(0.5)
