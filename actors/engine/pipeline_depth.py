"""How many steps the step loop keeps on the ranks when it plans the next
(``engine.max_steps_in_flight``): 2, 1, or ``auto``, which picks from what the ranks report.

With two steps on the ranks the next is queued before the running one ends, so the device
never waits for the controller; a request that arrives while step k runs starts in step
k + 3. With one, it starts in step k + 2, a step sooner to its first token, but the device
idles whenever the controller's turnaround (the results' way back, applying them, planning
the next step, its way out and launch) outlasts the running step.

After launching a step, a rank waits for the oldest step it returns. With two steps on the
ranks that wait is the step's time less the turnaround, and with one the same while it is
positive: the slack one step in flight would leave. ``auto`` keeps one step in flight while
every one of the last ``window`` steps left at least ``min_slack_s``, two otherwise.
"""

from __future__ import annotations

import collections
from typing import Union

AUTO = "auto"
WINDOW = 16
# Below this the turnaround's jitter (a slow Ray call, a garbage collection) would stall the
# device. On an H100 one step in flight cost nothing at 8 ms steps with a ~3 ms turnaround
# and halved a 1.6 ms step's speed (BENCHMARKS.md); 2 ms of slack sits between the two.
MIN_SLACK_S = 2e-3


class PipelineDepth:
    def __init__(self, setting: Union[int, str], window: int = WINDOW, min_slack_s: float = MIN_SLACK_S) -> None:
        assert setting in (1, 2, AUTO), setting
        self.setting = setting
        self.min_slack_s = min_slack_s
        self._slack: collections.deque[float] = collections.deque(maxlen=window)

    @property
    def steps(self) -> int:
        """The steps to keep on the ranks now."""
        if self.setting != AUTO:
            return self.setting
        full = len(self._slack) == self._slack.maxlen
        return 1 if full and min(self._slack) >= self.min_slack_s else 2

    def observe(self, slack_s: float) -> None:
        """A rank waited ``slack_s`` for a step's outputs after launching the step behind it."""
        self._slack.append(slack_s)
