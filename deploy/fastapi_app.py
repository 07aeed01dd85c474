"""The HTTP routes of an ingress replica over its ``OpenAIServer``: the OpenAI endpoints,
/tokenize and /detokenize, /health (open) and /admin/health, /metrics, the EPLB admin routes;
every error answers with OpenAI's error body, a bug with a 500 in that shape."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from raymoe.deploy.api_error import APIError
from raymoe.deploy.http_request import read_body, unless_client_leaves
from raymoe.deploy.openai_server import OpenAIServer

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 10.0
# below Prometheus's default scrape timeout (10 s): a scrape while the controller hangs still
# stores the replica's own metrics and raymoe_engine_unreachable
METRICS_TIMEOUT_S = 2.0
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before its answer
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def build_fastapi_app(server: OpenAIServer) -> FastAPI:
    """The HTTP routes over ``server``; every error answers with OpenAI's error body."""
    app = FastAPI(title="raymoe", docs_url=None, redoc_url=None, openapi_url=None)

    async def run(endpoint: str, request: Request, handler: Any) -> Response:
        try:
            server.authorize(request.headers.get("authorization"))
            result = await unless_client_leaves(request, handler(await read_body(request)))
        except APIError as e:
            server.metrics.count(endpoint, e.status)
            return JSONResponse(e.body(), status_code=e.status)
        except ClientDisconnect:  # gone before its answer: nothing to answer, nothing to log
            server.metrics.count(endpoint, CLIENT_CLOSED_REQUEST)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except Exception:  # a bug: still OpenAI's error shape, counted, details only in the log
            log.exception("%s: unexpected error", endpoint)
            server.metrics.count(endpoint, 500)
            message = "internal server error; the server log has the details"
            err = APIError(500, message, code="internal_error", type="server_error")
            return JSONResponse(err.body(), status_code=500)
        server.metrics.count(endpoint, 200)
        if isinstance(result, dict):
            return JSONResponse(result)
        if isinstance(result, bytes):  # a body already encoded (a large one, in slices)
            return Response(result, media_type="application/json")
        return StreamingResponse(result, media_type="text/event-stream", headers=_SSE_HEADERS)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await run("completions", request, server.completions)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await run("chat", request, server.chat)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await run("tokenize", request, server.tokenize)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await run("detokenize", request, server.detokenize)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await run("models", request, lambda body: _value(server.models()))

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> Response:
        return await run("models", request, lambda body: _value(server.model(name)))

    @app.get("/admin/eplb")
    async def eplb_status(request: Request) -> Response:
        return await run("eplb", request, server.eplb_status)

    @app.post("/admin/eplb/rebalance")
    async def rebalance(request: Request) -> Response:
        return await run("eplb", request, server.rebalance)

    @app.api_route("/health", methods=["GET", "HEAD"])  # load balancers probe with either
    async def health() -> Response:
        """Open, and bare: the state and a reason, nothing about processes or addresses."""
        status, body = await _health(server)
        return JSONResponse({k: body[k] for k in ("status", "reason") if k in body}, status_code=status)

    @app.get("/admin/health")
    async def health_details(request: Request) -> Response:
        """/health with the layout and the ranks, behind the API key; 503 unless ok, as /health."""
        try:
            server.authorize(request.headers.get("authorization"))
        except APIError as e:
            server.metrics.count("health", e.status)
            return JSONResponse(e.body(), status_code=e.status)
        status, body = await _health(server)
        server.metrics.count("health", status)
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        from raymoe.deploy.metrics import CONTENT_TYPE

        try:
            server.authorize(request.headers.get("authorization"))
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return Response(await server.metrics_text(METRICS_TIMEOUT_S), media_type=CONTENT_TYPE)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind)
        return JSONResponse(err.body(), status_code=exc.status_code)

    return app


async def _value(x: Any) -> Any:
    return x


async def _health(server: OpenAIServer) -> tuple[int, dict[str, Any]]:
    try:
        h = await asyncio.wait_for(server.controller.health.remote(), HEALTH_TIMEOUT_S)
    except Exception as e:  # a dead or hung controller: look for the one its host may have started
        log.warning("health: the controller does not answer: %r", e)
        asyncio.create_task(server.client.engine.reconnect())
        return 503, {"status": "degraded", "reason": "the engine's controller does not answer"}
    return (200 if h.get("status") == "ok" else 503), h
