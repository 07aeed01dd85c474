"""How the endpoint is reached: by default the ingress replica answers on serve.port
itself (Serve's direct ingress; Serve's proxy sits on another port); with
serve.direct_ingress off, Serve's proxy answers on serve.port. Either way the official
``openai`` client gets the same greedy completion there. With serve.num_replicas: 2 the
two ingress replicas serve concurrent streams side by side, each its own requests."""

from __future__ import annotations

import asyncio
import os
import pathlib
import socket
import urllib.request
from typing import Any

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
        out = client.completions.create(
            model="builtin:tiny-qwen3-moe", prompt="The capital of France is", max_tokens=8, temperature=0
        )
        return _listener(port), out.choices[0].text
    finally:
        stop_serving()


def test_direct_ingress_and_proxy_answer_alike_on_serve_port(ray_cluster: Any) -> None:
    direct_listener, direct_text = _serve_and_complete(direct=True)
    proxy_listener, proxy_text = _serve_and_complete(direct=False)
    # /proc's comm holds 15 characters: "ray::ServeRepli", "ray::ProxyActor"
    assert direct_listener.startswith("ray::ServeRepl") and proxy_listener == "ray::ProxyActor"
    assert direct_text and direct_text == proxy_text


def _two_free_ports() -> int:
    """A port p with p + 1 free as well (direct ingress gives replica i port p + i)."""
    for p in free_ports(20):
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two adjacent free ports")


def _completion_tokens(url: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("raymoe_completion_tokens_total")
    )


def test_two_ingress_replicas_each_serve_their_own_streams(ray_cluster: Any) -> None:
    port = _two_free_ports()
    config = load_config().replace({"serve.port": port, "serve.num_replicas": 2, "engine.max_num_seqs": 16})
    url = start_serving(config)
    urls = [url, f"http://127.0.0.1:{port + 1}"]
    args = dict(model="builtin:tiny-qwen3-moe", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    prompts = [f"Stream {i} goes" for i in range(8)]
    try:
        alone = {
            p: openai.OpenAI(base_url=url + "/v1", api_key="none").completions.create(prompt=p, **args).choices[0].text
            for p in prompts
        }
        before = [_completion_tokens(u) for u in urls]

        async def one(i: int) -> str:
            client = openai.AsyncOpenAI(base_url=urls[i % 2] + "/v1", api_key="none", max_retries=0, timeout=120)
            text = ""
            async for c in await client.completions.create(prompt=prompts[i % 8], stream=True, **args):
                text += "".join(ch.text for ch in c.choices)
            await client.close()
            return text

        async def main() -> list[str]:
            return await asyncio.gather(*(one(i) for i in range(32)))

        texts = asyncio.run(main())
        assert [t for t in texts] == [alone[prompts[i % 8]] for i in range(32)]
        # each replica counted the tokens of exactly the 16 streams sent to it
        assert [_completion_tokens(u) - b for u, b in zip(urls, before)] == [16 * 12, 16 * 12]
    finally:
        stop_serving()
