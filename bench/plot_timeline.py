"""Draw the convergence timeline of one bench_lab.py run as a PNG, with Qt's QPainter (no plotting library).

    .venv/bin/python bench/bench_lab.py --nodes 4 --runs 1 --timeline /tmp/timeline.json
    QT_QPA_PLATFORM=offscreen .venv/bin/python bench/plot_timeline.py /tmp/timeline.json docs/img/convergence.png

x is the time since the run started; one row per node plus one for the registrar. Markers are what each
node's agent logged (agent started, registered, peer added / removed), what the registrar logged (member
joined / unreachable / removed / active), and vertical lines for what the bench did (faults, recoveries) and
observed (removed everywhere, reachable from all, mesh complete).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QPointF, QRectF, Qt  # noqa: E402 - the platform must be chosen before Qt loads
from PySide6.QtGui import QColor, QFont, QGuiApplication, QImage, QPainter, QPen, QPolygonF  # noqa: E402

WIDTH = 1800
LEFT = 120
RIGHT = 40
TOP = 190  # room for the bench's action labels
ROW = 46
BOTTOM = 190  # axis and legend

# kind -> (colour, shape, legend text)
STYLES = {
    "start": ("#2e7d32", "triangle", "agent log: agent starting (after imports)"),
    "registered": ("#1565c0", "diamond", "agent registered"),
    "added": ("#43a047", "circle", "peer added (in this node's wg)"),
    "removed": ("#c62828", "cross", "peer removed (in this node's wg)"),
    "updated": ("#9e9e9e", "circle", "peer updated"),
    "reg-joined": ("#1565c0", "square", "registrar: member joined"),
    "reg-active": ("#43a047", "square", "registrar: member active again"),
    "reg-unreachable": ("#ef6c00", "square", "registrar: member unreachable"),
    "reg-removed": ("#6a1b9a", "square", "registrar: member removed"),
}
FAULT_WORDS = ("SIGKILL", "SIGSTOP", "link down", "crash", "SIGTERM", "broker stop")


def _marker(p: QPainter, shape: str, x: float, y: float, colour: str) -> None:
    p.setPen(QPen(QColor(colour), 2))
    p.setBrush(QColor(colour))
    r = 6.0
    if shape == "triangle":
        p.drawPolygon(QPolygonF([QPointF(x, y - r), QPointF(x - r, y + r), QPointF(x + r, y + r)]))
    elif shape == "diamond":
        p.drawPolygon(QPolygonF([QPointF(x, y - r), QPointF(x + r, y), QPointF(x, y + r), QPointF(x - r, y)]))
    elif shape == "square":
        p.drawRect(QRectF(x - r + 1, y - r + 1, 2 * r - 2, 2 * r - 2))
    elif shape == "cross":
        p.drawLine(QPointF(x - r, y - r), QPointF(x + r, y + r))
        p.drawLine(QPointF(x - r, y + r), QPointF(x + r, y - r))
    else:
        p.drawEllipse(QPointF(x, y), r - 1.5, r - 1.5)


def render(data: dict, out: Path) -> None:
    """Render the timeline `data` (bench_lab.py --timeline) into the PNG `out`."""
    rows: list[str] = data["nodes"]
    events: list[dict] = data["events"]
    marks: list[dict] = data["marks"]
    t_max = max([e["t"] for e in events] + [m["t"] for m in marks] + [1.0]) * 1.02
    height = TOP + ROW * len(rows) + BOTTOM
    image = QImage(WIDTH, height, QImage.Format.Format_ARGB32)
    image.fill(QColor("white"))
    p = QPainter(image)
    p.setRenderHint(QPainter.RenderHint.Antialiasing)
    plot_w = WIDTH - LEFT - RIGHT

    def x_of(t: float) -> float:
        return LEFT + plot_w * t / t_max

    def y_of(row: str) -> float:
        return TOP + ROW * rows.index(row) + ROW / 2

    # title
    p.setFont(QFont("DejaVu Sans", 15, QFont.Weight.Bold))
    p.setPen(QColor("black"))
    p.drawText(QPointF(LEFT, 30), f"meshvpn convergence, one run: N={data.get('n')} nodes, broker "
               f"{data.get('broker')}, heartbeat 1 s, TTL 3 s; faults hit {data.get('victim')} (bench/bench_lab.py)")
    # rows
    p.setFont(QFont("DejaVu Sans", 11))
    for i, row in enumerate(rows):
        y = y_of(row)
        if i % 2 == 0:
            p.fillRect(QRectF(LEFT, y - ROW / 2, plot_w, ROW), QColor("#f4f6f8"))
        p.setPen(QColor("black"))
        p.drawText(QRectF(8, y - ROW / 2, LEFT - 16, ROW), Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter,
                   row)
    # x axis
    axis_y = TOP + ROW * len(rows)
    p.setPen(QPen(QColor("black"), 1))
    p.drawLine(QPointF(LEFT, axis_y), QPointF(LEFT + plot_w, axis_y))
    step = 1.0 if t_max <= 25 else 2.0
    t = 0.0
    while t <= t_max:
        x = x_of(t)
        p.setPen(QPen(QColor("#dddddd"), 1))
        p.drawLine(QPointF(x, TOP), QPointF(x, axis_y))
        p.setPen(QColor("black"))
        p.drawLine(QPointF(x, axis_y), QPointF(x, axis_y + 5))
        p.drawText(QRectF(x - 30, axis_y + 6, 60, 18), Qt.AlignmentFlag.AlignHCenter, f"{t:g}")
        t += step
    p.drawText(QRectF(LEFT, axis_y + 24, plot_w, 20), Qt.AlignmentFlag.AlignHCenter, "seconds since the run started")

    # the bench's actions and observations: vertical lines, labels staggered in the top band
    p.setFont(QFont("DejaVu Sans", 9))
    levels = [-1e9] * 8
    for mark in sorted(marks, key=lambda m: m["t"]):
        x = x_of(mark["t"])
        what = mark["what"]
        fault = any(w in what for w in FAULT_WORDS)
        observed = mark["node"] == "*"
        colour = "#c62828" if fault else ("#2e7d32" if observed else "#1565c0")
        pen = QPen(QColor(colour), 1.6 if fault else 1.2)
        pen.setStyle(Qt.PenStyle.SolidLine if fault else Qt.PenStyle.DashLine)
        p.setPen(pen)
        p.drawLine(QPointF(x, TOP - 4), QPointF(x, axis_y))
        label = what
        width = p.fontMetrics().horizontalAdvance(label) + 6
        start = min(x + 2, WIDTH - width - 4)  # near the right edge the label goes left of its line
        level = next((i for i, end in enumerate(levels) if end < start), len(levels) - 1)
        levels[level] = start + width
        y = TOP - 12 - level * 16
        p.setPen(QColor(colour))
        p.drawText(QPointF(start, y), label)
        p.setPen(QPen(QColor(colour), 0.6, Qt.PenStyle.DotLine))
        p.drawLine(QPointF(x, y + 2), QPointF(x, TOP - 4))

    # the logged events
    for e in events:
        if e["node"] not in rows:
            continue
        colour, shape, _ = STYLES.get(e["kind"], ("#555555", "circle", e["kind"]))
        _marker(p, shape, x_of(e["t"]), y_of(e["node"]), colour)

    # legend
    p.setFont(QFont("DejaVu Sans", 10))
    lx, ly = LEFT, axis_y + 62
    for i, (_kind, (colour, shape, text)) in enumerate(STYLES.items()):
        cx = lx + (i % 3) * 420
        cy = ly + (i // 3) * 22
        _marker(p, shape, cx + 8, cy, colour)
        p.setPen(QColor("black"))
        p.drawText(QPointF(cx + 22, cy + 5), text)
    cy = ly + 3 * 22 + 6
    for j, (colour, dash, text) in enumerate((
            ("#c62828", False, "fault injected by the bench"),
            ("#1565c0", True, "recovery started by the bench"),
            ("#2e7d32", True, "observed by the bench (wg show / ping, all nodes)"))):
        cx = lx + j * 420
        pen = QPen(QColor(colour), 1.6)
        pen.setStyle(Qt.PenStyle.DashLine if dash else Qt.PenStyle.SolidLine)
        p.setPen(pen)
        p.drawLine(QPointF(cx, cy), QPointF(cx + 16, cy))
        p.setPen(QColor("black"))
        p.drawText(QPointF(cx + 22, cy + 5), text)
    p.end()
    if not image.save(str(out)):
        raise SystemExit(f"could not write {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("timeline", type=Path, help="JSON written by bench_lab.py --timeline")
    parser.add_argument("png", type=Path)
    args = parser.parse_args()
    _app = QGuiApplication(sys.argv)  # fonts need a GUI application, even offscreen
    render(json.loads(args.timeline.read_text()), args.png)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
