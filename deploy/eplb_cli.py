"""`raymoe eplb status|rebalance|report --url URL`: talk to a running endpoint's load balancer."""

from __future__ import annotations

import argparse
import json
import os
import urllib.request
from typing import Any, Optional

from raymoe.deploy.eplb_report import summary, write_report


def add_eplb_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        choices=["status", "rebalance", "report"],
        help="status: print it; rebalance: start one now; report: numbers + PNG heatmap",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the raymoe endpoint")
    p.add_argument("--api-key", default=os.environ.get("RAYMOE_API_KEY"), help="default: $RAYMOE_API_KEY")
    p.add_argument("--out", default="eplb_report.png", help="report: where to write the heatmap")
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the answer (a rebalance waits for its plan, up to the server's "
        "eplb.planning_timeout_s + 60 s)",
    )


def eplb_main(args: argparse.Namespace) -> int:
    if args.action == "rebalance":
        status = _call(args.url, "/admin/eplb/rebalance", args.api_key, args.timeout, body=b"{}")
        print(
            f"rebalance planned ({status.get('mode')}): balancedness {status.get('balancedness_before', 0):.4f} -> "
            f"{status.get('balancedness_after', 0):.4f}, {status.get('layers_total')} layer(s) to move; "
            f"state: {status.get('state')} (raymoe eplb status to follow it)"
        )
    elif args.action == "status":
        print(
            json.dumps(
                {
                    k: v
                    for k, v in _call(args.url, "/admin/eplb", args.api_key, args.timeout).items()
                    if not k.startswith("rank_load")
                },
                indent=2,
            )
        )
    else:
        status = _call(args.url, "/admin/eplb", args.api_key, args.timeout)
        print(write_report(status, args.out) if "rank_load_before" in status else summary(status))
    return 0


def _call(url: str, path: str, api_key: Optional[str], timeout: float, body: Optional[bytes] = None) -> dict[str, Any]:
    req = urllib.request.Request(url.rstrip("/") + path, data=body, method="POST" if body is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except TimeoutError:  # connected, no answer in time (a slow plan)
        raise ValueError(f"{path}: no answer from {url} within {timeout:g} s (--timeout)") from None
    except urllib.error.HTTPError as e:
        message = json.loads(e.read() or b"{}").get("error", {}).get("message", e.reason)
        raise ValueError(f"{path}: HTTP {e.code}: {message}") from None
    except urllib.error.URLError as e:
        raise ValueError(f"cannot reach {url}: {e.reason}") from None
