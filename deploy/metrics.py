"""Prometheus metrics of the OpenAI endpoint (served at GET /metrics).

Counters and histograms are updated by the request handlers as tokens stream; the
engine's state (queue depth, running requests, KV-cache usage per DP replica) is read
from the controller at scrape time. Each server owns its registry (no global state).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from raymoe.actors.engine.messages import EngineStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1,
    2.5,
    5,
    10,
    30,
)
_E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class ServeMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        self.requests = Counter(
            "raymoe_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("raymoe_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.completion_tokens = Counter("raymoe_completion_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram(
            "raymoe_time_to_first_token_seconds",
            "Request arrival to first token",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.itl = Histogram(
            "raymoe_inter_token_latency_seconds",
            "Time between a request's consecutive tokens",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.e2e = Histogram(
            "raymoe_request_latency_seconds", "Request arrival to last token", buckets=_E2E_BUCKETS_S, registry=r
        )
        self.in_flight = Gauge("raymoe_requests_in_flight", "Requests this server is streaming now", registry=r)
        self.waiting = Gauge("raymoe_requests_waiting", "Requests queued in the engine", ["dp_rank"], registry=r)
        self.running = Gauge(
            "raymoe_requests_running", "Requests in the engine's running batch", ["dp_rank"], registry=r
        )
        self.kv_usage = Gauge(
            "raymoe_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", ["dp_rank"], registry=r
        )
        self.steps = Gauge("raymoe_engine_steps", "Engine steps run since start", registry=r)
        self.prefix_hits = Gauge(
            "raymoe_prefix_cache_hit_tokens",
            "Tokens of starting requests whose KV came from the prefix cache, since start",
            ["dp_rank"],
            registry=r,
        )
        self.prefix_queries = Gauge(
            "raymoe_prefix_cache_query_tokens",
            "Tokens of starting requests (new or resumed after preemption), since start",
            ["dp_rank"],
            registry=r,
        )
        self.engine_failed = Gauge(
            "raymoe_engine_failed", "1 when the engine is down for good (restarts spent)", registry=r
        )
        self.engine_recovering = Gauge(
            "raymoe_engine_recovering", "1 while the rank group restarts after a failure", registry=r
        )
        self.restarts = Gauge(
            "raymoe_engine_restarts", "Rank-group restarts after failures since the controller started", registry=r
        )
        self.controllers_lost = Gauge(
            "raymoe_engine_controllers_lost",
            "Times this ingress replica found the engine's controller dead (Serve starts another)",
            registry=r,
        )
        self.engine_unreachable = Gauge(
            "raymoe_engine_unreachable",
            "1 when the engine's controller did not answer this scrape (the engine gauges keep their last values)",
            registry=r,
        )
        self.preemptions = Gauge("raymoe_preemptions", "Requests preempted (KV cache full) since start", registry=r)
        self.balancedness = Gauge(
            "raymoe_eplb_balancedness",
            "Mean over max EP-rank expert load (1 = even), last rebalance's load",
            ["placement"],
            registry=r,
        )
        self.rank_load = Gauge(
            "raymoe_eplb_rank_expert_load",
            "Tokens routed to each EP rank's experts, summed over MoE layers, in the last rebalance's window",
            ["ep_rank", "placement"],
            registry=r,
        )
        self.rebalances = Gauge("raymoe_eplb_rebalances", "Expert rebalances completed", registry=r)

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def render(self, stats: EngineStats | None, eplb: dict[str, Any] | None = None, controllers_lost: int = 0) -> bytes:
        """The exposition text, with engine gauges set from ``Controller.stats()`` and
        ``Controller.eplb_status()`` (None: the controller did not answer), and this replica's
        count of dead controllers."""
        self.controllers_lost.set(controllers_lost)
        self.engine_unreachable.set(1 if stats is None else 0)
        if stats is None:
            return generate_latest(self.registry)
        for dp, (w, run, kv) in enumerate(zip(stats.waiting, stats.running, stats.kv_usage)):
            self.waiting.labels(str(dp)).set(w)
            self.running.labels(str(dp)).set(run)
            self.kv_usage.labels(str(dp)).set(kv)
        for dp, (hits, queries) in enumerate(zip(stats.prefix_cache_hit_tokens, stats.prefix_cache_query_tokens)):
            self.prefix_hits.labels(str(dp)).set(hits)
            self.prefix_queries.labels(str(dp)).set(queries)
        self.steps.set(stats.steps)
        self.engine_failed.set(1 if stats.error else 0)
        self.engine_recovering.set(1 if stats.recovering else 0)
        self.restarts.set(stats.restarts)
        self.preemptions.set(stats.preemptions)
        if eplb and "rank_load_before" in eplb:
            self.rebalances.set(eplb["rebalances"])
            for placement in ("before", "after"):
                self.balancedness.labels(placement).set(eplb[f"balancedness_{placement}"])
                for rank, load in enumerate(map(sum, zip(*eplb[f"rank_load_{placement}"]))):
                    self.rank_load.labels(str(rank), placement).set(load)
        return generate_latest(self.registry)
