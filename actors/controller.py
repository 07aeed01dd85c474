"""The controller actor: owns the rank cluster and drives it.

It reserves the placement group, starts the rank actors, has them build every
process group, and exposes cluster-wide operations (barrier over any group,
health, shutdown). ``Controller`` is a plain class; callers start it with
``ray.remote(Controller)`` (see raymoe.deploy.launch).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

from raymoe.actors.cluster import RankCluster, start_rank_cluster
from raymoe.cluster.config import Config
from raymoe.cluster.layout import RankLayout

log = logging.getLogger(__name__)


class Controller:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.layout = RankLayout.from_config(config.parallel)
        self.cluster: Optional[RankCluster] = None

    def start(self) -> dict[str, Any]:
        """Bring up every rank; returns what each rank reported (rank, device, node, GPU)."""
        assert self.cluster is None, "controller already started"
        t0 = time.perf_counter()
        self.cluster = start_rank_cluster(
            self.layout, self.config.parallel.device, self.config.parallel.placement_timeout_s
        )
        return {
            "layout": self.layout.describe(),
            "ranks": self.cluster.infos,
            "startup_s": round(time.perf_counter() - t0, 2),
        }

    def barrier(self, group: str = "world") -> float:
        """Barrier over every group of ``group`` kind (each rank joins its own); returns seconds."""
        t0 = time.perf_counter()
        self._cluster().call("barrier", group)
        return time.perf_counter() - t0

    def execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(ctx, *args, **kwargs)`` on every rank; results in rank order."""
        return self._cluster().call("execute", fn, *args, **kwargs)

    def health(self) -> dict[str, Any]:
        if self.cluster is None:
            return {"status": "starting", "layout": self.layout.describe()}
        try:
            ranks = self.cluster.call("health")
        except Exception as e:  # a dead rank: degraded, with the reason
            return {"status": "degraded", "error": f"{type(e).__name__}: {e}", "layout": self.layout.describe()}
        return {"status": "ok", "layout": self.layout.describe(), "ranks": ranks}

    def shutdown(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None

    def _cluster(self) -> RankCluster:
        if self.cluster is None:
            raise RuntimeError("controller not started")
        return self.cluster
