"""The ``raymoe`` command's answer to a user's mistake: one line naming the field, exit code
2, before anything starts where the mistake can be seen first."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import ray

from raymoe.deploy.cli import main


def test_a_missing_checkpoint_fails_in_one_line_before_ray_starts(tmp_path, capsys):
    assert not ray.is_initialized()
    assert main(["generate", "--model", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raymoe generate: error: model.path: ") and err.count("\n") == 1
    assert not ray.is_initialized()  # a local Ray would run the ranks here: checked before starting it


def test_an_address_with_no_ray_fails_in_one_line_at_once():
    with socket.socket() as held:  # bound, not listening: connections are refused
        held.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{held.getsockname()[1]}"
        started = time.monotonic()
        done = subprocess.run(  # Ray's own connection retries take many minutes
            [sys.executable, "-m", "raymoe.deploy.cli", "serve", "--port", "0", "--address", address],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith(f"raymoe serve: error: --address {address} (or $RAY_ADDRESS): no Ray there (")
    assert done.stderr.count("\n") == 1 and time.monotonic() - started < 30


class _SlowEplb(http.server.BaseHTTPRequestHandler):
    """An endpoint whose rebalance answers after ``delay_s``."""

    delay_s = 0.0

    def do_POST(self):
        time.sleep(self.delay_s)
        body = json.dumps({"mode": "global", "balancedness_before": 0.5, "balancedness_after": 0.9}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("delay_s,timeout,code", [(0.0, 5.0, 0), (2.0, 0.5, 2)])
def test_eplb_rebalance_waits_for_its_plan_up_to_the_timeout(delay_s, timeout, code, capsys):
    handler = type("Handler", (_SlowEplb,), {"delay_s": delay_s})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["eplb", "rebalance", "--url", url, "--timeout", str(timeout)]) == code
    finally:
        server.shutdown()
    out = capsys.readouterr()
    if code == 0:
        assert "balancedness 0.5000 -> 0.9000" in out.out
    else:
        assert out.err == f"raymoe eplb: error: /admin/eplb/rebalance: no answer from {url} within 0.5 s (--timeout)\n"
