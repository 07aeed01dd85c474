"""A timeline of every step a rank runs, for finding where a served workload's time goes:
how long the host took to launch each step, how long the device spent on it, and how long
the device sat idle between steps (waiting for the controller's next call).

    RAYMOE_STEP_TRACE=/tmp/trace PYTHONPATH=benchmarks/runner_patches \\
        python benchmarks/serve_bench.py --suite ...
    python benchmarks/runner_patches/step_trace.py /tmp/trace [--phases serve_bench.log]

Each rank process appends one JSON line per step to ``<dir>/<pid>.jsonl``, written as each
step is collected (Ray kills actors without running exit hooks). On CUDA the device times come from two
events around the step's launch; elsewhere they are left out. Running it with the patch adds
two event records per step and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time
from collections import defaultdict
from typing import Any


def install(runner_module: Any) -> None:
    """Patch ``runner_module.ModelRunner.launch`` and ``collect`` to record each step."""
    import torch

    out_dir = pathlib.Path(os.environ["RAYMOE_STEP_TRACE"])
    out_dir.mkdir(parents=True, exist_ok=True)
    trace = open(out_dir / f"{os.getpid()}.jsonl", "a", buffering=1)  # a line at a time: Ray kills actors
    runner = runner_module.ModelRunner
    launch, collect = runner.launch, runner.collect

    def event(device: Any) -> Any:
        if device.type != "cuda":
            return None
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def traced_launch(self, step):
        q = step.query_lens
        tokens = max(step.dp_token_counts)
        if self.graphs is not None and step.all_decode and self.graphs.size_for(tokens):
            path = "decode graph"
        elif getattr(self, "mixed_graphs", None) is not None:
            path = "piecewise graphs" if self.mixed_graphs.size_for(tokens) else "eager"
        else:
            path = "eager"
        record = {
            "t0": time.time(),
            "rows": int((q > 0).sum()),
            "prefill_tokens": int(q.sum()) - int((q > 0).sum()),
            "kind": f"{path}, {'with prefill' if int(q.max(initial=0)) > 1 else 'decode only'}",
        }
        start = event(self.device)
        t = time.perf_counter()
        launch(self, step)
        record["launch_ms"] = (time.perf_counter() - t) * 1e3
        self.__dict__.setdefault("_trace_pending", []).append((record, start, event(self.device)))

    def traced_collect(self, keep):
        outputs = collect(self, keep)
        pending = self.__dict__.setdefault("_trace_pending", [])
        done = len(pending) - len(self._in_flight)
        if done > 0:
            finished, pending[:] = pending[:done], pending[done:]
            now = time.time()
            for record, start, end in finished:
                record["collected"] = now
                if start is not None:
                    record["device_ms"] = start.elapsed_time(end)
                    last = self.__dict__.get("_trace_last_end")
                    record["idle_before_ms"] = last.elapsed_time(start) if last is not None else None
                    self._trace_last_end = end
                trace.write(json.dumps(record) + "\n")
        return outputs

    runner.launch = traced_launch
    runner.collect = traced_collect


def summarize(records: list[dict]) -> str:
    """Per kind of step: count, mean launch and device times; then where the wall time went."""
    if not records:
        return "no steps recorded"
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_kind[r["kind"]].append(r)
    lines = ["| step | count | rows mean | prefill tokens mean | launch ms mean | device ms mean | device ms total |"]
    lines.append("|---|---|---|---|---|---|---|")
    for kind, rs in sorted(by_kind.items()):
        dev = [r["device_ms"] for r in rs if "device_ms" in r]
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        lines.append(
            f"| {kind} | {len(rs)} | {mean([r['rows'] for r in rs]):.1f} | "
            f"{mean([r['prefill_tokens'] for r in rs]):.0f} | {mean([r['launch_ms'] for r in rs]):.2f} | "
            f"{mean(dev):.2f} | {sum(dev):.0f} |"
        )
    wall = (max(r["collected"] for r in records) - min(r["t0"] for r in records)) * 1e3
    if not any("device_ms" in r for r in records):
        return "\n".join(lines) + f"\n\n{len(records)} steps over {wall:.0f} ms (no device times: not CUDA)"
    busy = sum(r.get("device_ms", 0.0) for r in records)
    idle = [r["idle_before_ms"] for r in records if r.get("idle_before_ms") is not None]
    lines.append(
        f"\n{len(records)} steps over {wall:.0f} ms: device spans {busy:.0f} ms ({busy / wall:.0%}), "
        f"device idle between steps {sum(idle):.0f} ms (gaps over 1 ms: {sum(1 for g in idle if g > 1)}, "
        f"{sum(g for g in idle if g > 1):.0f} ms)"
    )
    return "\n".join(lines)


def phases(log: str) -> list[tuple[str, float, float]]:
    """(name, start, end) of every ``phase: NAME START END`` line serve_bench.py --suite printed."""
    found = []
    for line in pathlib.Path(log).read_text().splitlines():
        if line.startswith("phase: "):
            name, start, end = line[len("phase: ") :].rsplit(" ", 2)
            found.append((name, float(start), float(end)))
    return found


def main() -> None:
    p = argparse.ArgumentParser(description="summarize the step timelines in a RAYMOE_STEP_TRACE directory")
    p.add_argument("trace_dir")
    p.add_argument("--phases", help="a serve_bench.py --suite log: summarize each of its phases apart")
    args = p.parse_args()
    for path in sorted(pathlib.Path(args.trace_dir).glob("*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        if not records:  # a process that imported the runner but ran no step (the controller)
            continue
        print(f"## {path.name}")
        for name, start, end in phases(args.phases) if args.phases else [("all steps", 0.0, float("inf"))]:
            print(f"### {name}\n{summarize([r for r in records if start <= r['t0'] <= end])}\n")


if __name__ == "__main__":
    main()
