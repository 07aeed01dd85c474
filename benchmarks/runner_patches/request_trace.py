"""Where a served request's time to first token goes: timestamps of every request as it
passes the ingress's engine client and the controller's engine, for lining up against the
client's own send and first-token times.

    RAYMOE_REQUEST_TRACE=/tmp/rtrace PYTHONPATH=benchmarks/runner_patches \\
        python benchmarks/prefix_cache_bench.py --caching on --json on.json ...
    python benchmarks/runner_patches/request_trace.py /tmp/rtrace --client on.json

Each process appends one JSON line per event to ``<dir>/<pid>.jsonl``: ``{"t": unix time,
"ev": name, "n": requests concerned}``. The events, in a request's order:

- ``handler``: the ingress's completions handler starts (HTTP and Serve are behind it);
- ``stream``: the ingress's engine client takes the request (parsed and tokenized);
- ``submit sent``: the engine client's call to the controller goes out with it;
- ``submit``: the controller's engine takes a batch of requests (its ``submit`` call ran);
- ``scheduled``: a step that samples the request's first token is planned;
- ``published``: its token is applied and handed to the output router;
- ``delivered``: the ingress's poll brought the first token back;
- ``step done``: the controller applied steps (any request's), for counting the steps a
  request waits through.

Requests of one wave are told apart only by order: the k-th event of each kind in a wave is
taken as the k-th request's (the queues are first in, first out).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import pathlib
import statistics
import time
from typing import Any

_trace = None


def _log(ev: str, n: int) -> None:
    global _trace
    if n <= 0:
        return
    if _trace is None:
        out = pathlib.Path(os.environ["RAYMOE_REQUEST_TRACE"])
        out.mkdir(parents=True, exist_ok=True)
        _trace = open(out / f"{os.getpid()}.jsonl", "a", buffering=1)  # a line at a time: Ray kills actors
    _trace.write(json.dumps({"t": time.time(), "ev": ev, "n": n}) + "\n")


def _first_tokens(planned: Any) -> int:
    return sum(1 for pending in planned.pending for entry in pending if entry and entry[1] == 0)


def install_openai_server(module: Any) -> None:
    server = module.OpenAIServer
    completions = server.completions

    async def traced_completions(self, body):
        _log("handler", 1)
        return await completions(self, body)

    server.completions = traced_completions


def install_engine_client(module: Any) -> None:
    client = module.EngineClient
    stream, dispatch, submit = client.stream, client._dispatch, client._submit

    def traced_stream(self, prompt_token_ids, sampling):
        _log("stream", 1)
        return stream(self, prompt_token_ids, sampling)

    async def traced_submit(self, new):
        _log("submit sent", len(new))
        return await submit(self, new)

    def traced_dispatch(self, batch):
        new = {e.seq for e in batch.entries() if e.seq in self._streams and not self._streams[e.seq].received}
        dispatch(self, batch)
        _log("delivered", len(new))

    client.stream, client._dispatch, client._submit = traced_stream, traced_dispatch, traced_submit


def install_async_engine(module: Any) -> None:
    engine = module.AsyncEngine
    submit, publish = engine.submit, engine._publish
    core = module.EngineCore
    schedule = core.schedule

    async def traced_submit(self, client, requests):
        _log("submit", len(requests))
        return await submit(self, client, requests)

    def traced_schedule(self):
        planned = schedule(self)
        if planned is not None:
            _log("scheduled", _first_tokens(planned))
        return planned

    def traced_publish(self, in_flight, completed, **kwargs):
        first = sum(_first_tokens(in_flight[i]) for i in range(len(completed)))
        publish(self, in_flight, completed, **kwargs)
        _log("published", first)
        _log("step done", len(completed))

    engine.submit, engine._publish, core.schedule = traced_submit, traced_publish, traced_schedule


EVENTS = ("sent", "handler", "stream", "submit sent", "submit", "scheduled", "published", "delivered", "first token")


def expand(records: list[dict]) -> dict[str, list[float]]:
    """Every event kind's times, one per request (an event of n requests counts n times)."""
    times: dict[str, list[float]] = {ev: [] for ev in EVENTS}
    for r in records:
        if r["ev"] in times:
            times[r["ev"]].extend([r["t"]] * r["n"])
    return {ev: sorted(ts) for ev, ts in times.items()}


def waves(times: dict[str, list[float]], concurrency: int) -> list[dict[str, list[float]]]:
    """Split each kind's sorted times into runs of ``concurrency`` (the bench's waves)."""
    n = len(times["sent"])
    return [{ev: ts[i : i + concurrency] for ev, ts in times.items()} for i in range(0, n, concurrency)]


def steps_between(records: list[dict], times: dict[str, list[float]], a: str, b: str) -> list[int]:
    """For each request, how many steps the controller applied between its event ``a`` and ``b``."""
    done = sorted(r["t"] for r in records if r["ev"] == "step done")
    n = len(times["sent"])  # the bench's requests (later events are the offline decode's)
    return [bisect.bisect(done, tb) - bisect.bisect(done, ta) for ta, tb in zip(times[a][:n], times[b][:n])]


def table(times: dict[str, list[float]], concurrency: int) -> str:
    """Per wave: the median of each stage (k-th event of one kind to the k-th of the next)
    and how the wave's requests spread out at each event."""
    present = [ev for ev in EVENTS if times[ev]]
    stages = list(zip(present, present[1:]))
    head = " | ".join(f"{a} -> {b}" for a, b in stages)
    lines = [f"| wave | {head} | spread at " + " / ".join(present) + " |", "|---" * (len(stages) + 2) + "|"]
    for w, wave in enumerate(waves({ev: times[ev] for ev in present}, concurrency)):
        meds = []
        for a, b in stages:
            gaps = [(tb - ta) * 1e3 for ta, tb in zip(wave[a], wave[b])]
            meds.append(f"{statistics.median(gaps):.1f}" if gaps else "-")
        spread = " / ".join(f"{(max(ts) - min(ts)) * 1e3:.0f}" if ts else "-" for ts in wave.values())
        lines.append(f"| {w + 1} | {' | '.join(meds)} | {spread} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description="summarize a RAYMOE_REQUEST_TRACE directory (ms)")
    p.add_argument("trace_dir")
    p.add_argument("--client", required=True, help="prefix_cache_bench.py --caching ... --json's output")
    args = p.parse_args()
    records = [
        json.loads(line)
        for path in sorted(pathlib.Path(args.trace_dir).glob("*.jsonl"))
        for line in path.read_text().splitlines()
        if line
    ]
    client = json.loads(pathlib.Path(args.client).read_text())
    start = client["start_unix_s"]
    for r in client["requests"]:
        records.append({"t": start + r["sent_s"], "ev": "sent", "n": 1})
        records.append({"t": start + r["sent_s"] + r["ttft_s"], "ev": "first token", "n": 1})
    records = [r for r in records if r["t"] >= start]  # the warm-up ran before
    times = expand(records)
    print(table(times, client["concurrency"]))
    for a, b in (("submit", "scheduled"), ("scheduled", "published")):
        if times[a] and times[b] and any(r["ev"] == "step done" for r in records):
            counts = steps_between(records, times, a, b)
            print(
                f"\nsteps applied between {a} and {b}: median {statistics.median(counts)}, "
                f"histogram {dict(sorted(collections.Counter(counts).items()))}"
            )


if __name__ == "__main__":
    main()
