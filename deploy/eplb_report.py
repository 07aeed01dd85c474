"""`raymoe eplb report`: expert load per EP rank before and after the last rebalance.

Renders a PNG heatmap (rows = MoE layers, columns = EP ranks; left panel before,
right panel after, one colour scale) with a small PNG writer of its own (zlib +
the PNG chunk format), so no imaging library is needed, and prints the numbers.
"""

from __future__ import annotations

import struct
import zlib
from typing import Sequence

# a perceptual dark-blue -> green -> yellow ramp (viridis-like anchors)
_RAMP = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
CELL_W, CELL_H, GAP = 16, 6, 12


def colour(x: float) -> tuple[int, int, int]:
    """x in [0, 1] -> RGB on the ramp."""
    x = min(max(x, 0.0), 1.0) * (len(_RAMP) - 1)
    i = min(int(x), len(_RAMP) - 2)
    f = x - i
    return tuple(round(a + (b - a) * f) for a, b in zip(_RAMP[i], _RAMP[i + 1]))  # type: ignore[return-value]


def heatmap_png(panels: Sequence[Sequence[Sequence[float]]]) -> bytes:
    """PNG bytes of side-by-side heatmaps (each [rows][cols]) on one shared scale."""
    top = max((v for p in panels for row in p for v in row), default=0.0) or 1.0
    rows = max(len(p) for p in panels)
    width = sum(len(p[0]) * CELL_W for p in panels) + GAP * (len(panels) - 1)
    lines = []
    for y in range(rows * CELL_H):
        line = bytearray([0])  # filter type 0 (none)
        for n, panel in enumerate(panels):
            if n:
                line += bytes([255, 255, 255]) * GAP
            row = panel[y // CELL_H] if y // CELL_H < len(panel) else [0.0] * len(panel[0])
            for v in row:
                line += bytes(colour(v / top)) * CELL_W
        lines.append(bytes(line))
    return _png(width, rows * CELL_H, b"".join(lines))


def _png(width: int, height: int, raw: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def summary(status: dict) -> str:
    """Human-readable numbers of an EPLB status (Controller.eplb_status)."""
    if not status.get("enabled"):
        return "EPLB is disabled (eplb.enabled: false, or the model has no MoE layers)"
    skipped = f"\nlast rebalance skipped: {status['skipped']}" if status.get("skipped") else ""
    if "rank_load_before" not in status:
        return (
            f"EPLB: no rebalance yet (state {status.get('state')}, {status.get('steps_to_rebalance', '?')} steps to go)"
            + skipped
        )
    lines = [
        f"rebalances: {status['rebalances']}, state: {status['state']}",
        f"balancedness (sum of mean rank load / sum of max): {status['balancedness_before']:.4f} -> "
        f"{status['balancedness_after']:.4f}",
        f"moved: {status['bytes_moved'] / 2**20:.1f} MiB over {status['layers_total']} layer(s); planning took "
        f"{status.get('plan_s', 0):.3f} s",
        f"mode: {status.get('mode', '?')}; slots moved: {status.get('moved_slots', '?')}, left in place for "
        f"gaining too little (eplb.min_improvement, the load's sampling noise): {status.get('skipped_slots', '?')}",
    ]
    if "rebalance_step_ms_max" in status:
        lines.append(
            f"steps during the rebalance (planning, moves): {status['rebalance_steps']}, median "
            f"{status['rebalance_step_ms_median']:.2f} ms, longest {status['rebalance_step_ms_max']:.2f} ms "
            f"(outside rebalances: median {status.get('step_ms_median', float('nan')):.2f} ms)"
        )
    lines.append("per-rank load summed over layers, before -> after:")
    before = [sum(col) for col in zip(*status["rank_load_before"])]
    after = [sum(col) for col in zip(*status["rank_load_after"])]
    lines += [f"  rank {r}: {b:,.0f} -> {a:,.0f}" for r, (b, a) in enumerate(zip(before, after))]
    return "\n".join(lines) + skipped


def write_report(status: dict, path: str) -> str:
    """Write the heatmap to ``path`` (if there is a plan) and return the summary text."""
    text = summary(status)
    if "rank_load_before" in status:
        with open(path, "wb") as f:
            f.write(heatmap_png([status["rank_load_before"], status["rank_load_after"]]))
        text += f"\nheatmap (layers x EP ranks; before | after): {path}"
    return text
