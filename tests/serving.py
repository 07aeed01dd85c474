"""The Serve app on a free local port, for the tests that talk to a live endpoint."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from ports import free_ports


@contextlib.contextmanager
def served(config: Any) -> Iterator[str]:
    """Deploy ``config``'s app (Ray must be up); yields its base URL; shuts Serve down after."""
    from ray import serve

    from raymoe.deploy.serve_app import APP_NAME, app_for, serve_start

    port = free_ports(1)[0]
    serve_start("127.0.0.1", port, config.serve.direct_ingress)
    try:
        serve.run(app_for(config), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
