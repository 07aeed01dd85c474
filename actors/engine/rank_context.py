"""RankContext: what one rank knows about itself, as plain data (no Ray).

The rank actor builds it after joining torch.distributed; the in-process engine
builds one for a world of one. Code run on a rank takes it as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from raymoe.cluster.layout import RankCoord, RankLayout
from raymoe.comm.groups import Groups


@dataclass(kw_only=True)
class RankContext:
    """What one rank knows about itself; passed explicitly to code run on the rank."""

    layout: RankLayout
    coord: RankCoord
    device: torch.device
    groups: Groups
    state: dict[str, Any] = field(default_factory=dict)  # per-rank objects (e.g. the model runner)

    @property
    def rank(self) -> int:
        return self.coord.rank
