"""The URL ``raymoe serve`` prints is one clients can use: bound to every interface (0.0.0.0, ::),
it names the head node's IP, where the ingress replicas and Serve's proxy answer."""

from __future__ import annotations

from raymoe.deploy.serve_app import HEAD_NODE_RESOURCE, client_host

NODES = [
    {"ip": "10.0.0.7", "resources": {"CPU": 8.0, "node:10.0.0.7": 1.0}},
    {"ip": "10.0.0.5", "resources": {"CPU": 8.0, "node:10.0.0.5": 1.0, HEAD_NODE_RESOURCE: 1.0}},
]


def test_a_wildcard_host_is_the_head_nodes_ip():
    assert client_host("0.0.0.0", NODES) == "10.0.0.5"
    assert client_host("::", NODES) == "10.0.0.5"


def test_an_ipv6_head_is_bracketed():
    nodes = [{"ip": "fd00::5", "resources": {HEAD_NODE_RESOURCE: 1.0}}]
    assert client_host("::", nodes) == "[fd00::5]"


def test_a_named_interface_is_kept():
    assert client_host("127.0.0.1", NODES) == "127.0.0.1"
    assert client_host("10.0.0.5", NODES) == "10.0.0.5"
