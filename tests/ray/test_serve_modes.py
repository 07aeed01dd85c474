"""How the endpoint is reached: by default the ingress replica answers on serve.port
itself (Serve's direct ingress; Serve's proxy sits on another port); with
serve.direct_ingress off, Serve's proxy answers on serve.port. Either way the official
``openai`` client gets the same greedy completion there."""
from __future__ import annotations

from typing import Any

import os
import pathlib

import openai

from ports import free_ports
from raymoe.cluster.config import load_config
from raymoe.deploy.serve_app import start_serving, stop_serving


def _listener(port: int) -> str:
    """The name of the process listening on TCP ``port`` (Ray names its actor processes
    ``ray::<class>``), from Linux's /proc: the listening socket's inode, then its owner."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in pathlib.Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    owners = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                owners.add(pathlib.Path(f"/proc/{pid}/comm").read_text().strip())
        except OSError:  # gone meanwhile, or not ours to read
            continue
    assert len(owners) == 1, f"listeners on {port}: {owners}"
    return owners.pop()


def _serve_and_complete(direct: bool) -> tuple[str, str]:
    """(the listener on serve.port, a greedy completion from it)."""
    port = free_ports(1)[0]
    url = start_serving(load_config().replace({"serve.port": port, "serve.direct_ingress": direct}))
    try:
        assert url == f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        out = client.completions.create(model="builtin:tiny-qwen3-moe", prompt="The capital of France is",
                                        max_tokens=8, temperature=0)  # fmt: skip
        return _listener(port), out.choices[0].text
    finally:
        stop_serving()


def test_direct_ingress_and_proxy_answer_alike_on_serve_port(ray_cluster: Any) -> None:
    direct_listener, direct_text = _serve_and_complete(direct=True)
    proxy_listener, proxy_text = _serve_and_complete(direct=False)
    # /proc's comm holds 15 characters: "ray::ServeRepli", "ray::ProxyActor"
    assert direct_listener.startswith("ray::ServeRepl") and proxy_listener == "ray::ProxyActor"
    assert direct_text and direct_text == proxy_text
