"""The EPLB heatmap is a valid PNG (checked with zlib and the PNG chunk CRCs) whose cells
carry the colour of their value on one scale shared by both panels."""

from __future__ import annotations

import struct
import zlib

from raymoe.deploy.eplb_report import CELL_H, CELL_W, GAP, colour, heatmap_png, summary


def _decode(png: bytes) -> tuple[int, int, list[bytes]]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", png[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + data) & 0xFFFFFFFF, f"bad CRC in {kind}"
        chunks[kind] = data
        pos += 12 + length
    width, height, depth, ctype = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, ctype) == (8, 2)
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 1 + 3 * width
    rows = [raw[i * stride : (i + 1) * stride] for i in range(height)]
    assert all(r[0] == 0 for r in rows)
    return width, height, [r[1:] for r in rows]


def test_cells_have_the_colour_of_their_value():
    before = [[1.0, 3.0, 0.0], [2.0, 2.0, 2.0]]
    after = [[2.0, 2.0, 0.0], [4.0, 1.0, 1.0]]
    width, height, rows = _decode(heatmap_png([before, after]))
    assert (width, height) == (6 * CELL_W + GAP, 2 * CELL_H)
    top = 4.0
    for panel, data, x0 in ((0, before, 0), (1, after, 3 * CELL_W + GAP)):
        for r, row in enumerate(data):
            for c, v in enumerate(row):
                x, y = x0 + c * CELL_W + CELL_W // 2, r * CELL_H + CELL_H // 2
                assert tuple(rows[y][3 * x : 3 * x + 3]) == colour(v / top), (panel, r, c)
    assert tuple(rows[0][3 * (3 * CELL_W) : 3 * (3 * CELL_W) + 3]) == (255, 255, 255)  # the gap


def test_colour_ramp_ends_and_clamps():
    assert colour(0.0) == (68, 1, 84) and colour(1.0) == (253, 231, 37)
    assert colour(-1.0) == colour(0.0) and colour(2.0) == colour(1.0)


def test_summary_states():
    assert "disabled" in summary({"enabled": False})
    assert "no rebalance yet" in summary({"enabled": True, "state": "waiting", "steps_to_rebalance": 5})
    text = summary(
        {
            "enabled": True,
            "rebalances": 1,
            "state": "done",
            "balancedness_before": 0.5,
            "balancedness_after": 0.9,
            "bytes_moved": 2**21,
            "layers_total": 2,
            "plan_s": 0.01,
            "mode": "global",
            "moved_slots": 7,
            "skipped_slots": 3,
            "rank_load_before": [[3, 1], [3, 1]],
            "rank_load_after": [[2, 2], [2, 2]],
        }
    )
    assert "0.5000 -> 0.9000" in text and "rank 0: 6 -> 4" in text and "2.0 MiB" in text
    assert "mode: global; slots moved: 7" in text and "sampling noise): 3" in text
