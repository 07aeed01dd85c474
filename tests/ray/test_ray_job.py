"""`ray job submit -- raymoe serve` against a real local head (`ray start --head`).

The head runs with its own free ports and its own temp dir (so no other `ray.init()`
on this host can attach to it), is stopped by signalling the `ray start --block`
process this test started (never `ray stop`, which would stop every Ray on the host),
and the job runs the installed `raymoe` console script: no working_dir. Token
authentication is off for this private localhost head (RAY_AUTH_MODE=disabled), so the
test does not depend on a token in ~/.ray. A head whose dashboard (the job server) does
not come up fails the test.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Callable

import openai
import pytest
from ports import free_ports

BIN = pathlib.Path(sys.executable).parent


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _wait(cond: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(1.0)
    raise TimeoutError(what)


@pytest.fixture
def ray_head() -> Any:
    """A `ray start --head --block` of our own; yields (dashboard URL, env)."""
    if shutil.which("ray", path=str(BIN)) is None or shutil.which("raymoe", path=str(BIN)) is None:
        pytest.skip("the ray / raymoe console scripts are not installed next to this Python")
    gcs, dash, client, agent_http, agent_grpc, metrics, node_mgr, obj_mgr, runtime_env = free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rmj", dir="/tmp")  # short: Ray's unix socket paths live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--port={gcs}",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_mgr}",
        f"--object-manager-port={obj_mgr}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--temp-dir={temp_dir}",
    ]
    log_path = pathlib.Path(temp_dir) / "ray-start.log"
    log = open(log_path, "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        try:
            _wait(lambda: head.poll() is not None or _get(url + "/api/version") == 200, 90, "dashboard")
        except TimeoutError:
            pytest.fail(f"the Ray dashboard (job server) did not come up in 90 s:\n{log_path.read_text()[-3000:]}")
        if head.poll() is not None:
            pytest.fail(f"ray start --head exited ({head.returncode}):\n{log_path.read_text()[-3000:]}")
        yield url, env
    finally:
        _stop_head(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_head(head: subprocess.Popen) -> None:
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # stragglers of the session this test created
    except ProcessLookupError:
        pass


def _job(env: dict, *args: str) -> str:
    """Run ``ray job ARGS`` against the head; its output."""
    done = subprocess.run([str(BIN / "ray"), "job", *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"ray job {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_ray_job_submit_raymoe_serve(ray_head):
    url, env = ray_head
    (port,) = free_ports(1)
    sid = f"raymoe-serve-{port}"
    runtime_env = '{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}}'  # time for a clean Serve shutdown
    _job(
        env,
        "submit",
        "--address",
        url,
        "--submission-id",
        sid,
        "--no-wait",
        "--runtime-env-json",
        runtime_env,
        "--",
        "raymoe",
        "serve",
        "--port",
        str(port),
    )
    base = f"http://127.0.0.1:{port}"

    def serving() -> bool:
        status = _job(env, "status", "--address", url, sid)
        assert "FAILED" not in status and "STOPPED" not in status, _job(env, "logs", "--address", url, sid)
        return _get(base + "/health") == 200

    _wait(serving, 300, "the job's endpoint to serve")
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
    r = client.completions.create(model="builtin:tiny-qwen3-moe", prompt="Hello", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("length", "stop")
    assert "raymoe: serving" in _job(env, "logs", "--address", url, sid)

    # SIGTERM to the driver: it shuts Serve down (the default 3 s before SIGKILL is raised above)
    _job(env, "stop", "--address", url, sid)
    assert "stopped" in _job(env, "status", "--address", url, sid).lower()
    _wait(lambda: _get(base + "/health") == 0, 60, "Serve's proxy to go away")
    logs = _job(env, "logs", "--address", url, sid)
    assert "raymoe: stopping" in logs and "raymoe: stopped" in logs
