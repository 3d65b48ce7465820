"""``training_curves.svg``: the run's loss and main metric, drawn by hand as SVG from ``train_log.jsonl``.

Every backend writes the same log, so one reader serves them all; SVG needs no plotting library (matplotlib is
not a dependency), opens in any browser, and renders inside the model card on the Hub and on GitHub.
Top panel: training loss per logged step, evaluation loss per evaluation, the final evaluation. Bottom panel (when
evaluations report it): the task's main metric (``metric_for_best_model``).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence
from xml.sax.saxutils import escape

from ..output import atomic_text

log = logging.getLogger("tunepipe")

CURVES_FILE = "training_curves.svg"
MAX_POINTS = 10_000  # per series; longer logs keep every k-th point (and the last), so the file stays small
WIDTH, PANEL_H, LEFT, RIGHT, TOP, GAP, BOTTOM = 760, 240, 72, 24, 64, 84, 46  # TOP/GAP hold title and legend
COLORS = {"train": "#1f77b4", "eval": "#d62728", "final": "#2ca02c"}

Points = list[tuple[float, float]]


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of train_log.jsonl; a line cut short by a crash is skipped, not an error."""
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(records: Sequence[dict[str, Any]], key: str) -> Points:
    """(step, value) of every record holding a finite ``key``."""
    return [(float(r["step"]), float(r[key])) for r in records if _number(r.get(key)) and _number(r.get("step"))]


def curves(records: Sequence[dict[str, Any]], metric: str | None) -> dict[str, dict[str, Points]]:
    """Panel title -> {legend label: points}. The metric panel is left out when no evaluation reports it."""
    panels = {"loss": {"training loss": series(records, "loss"), "evaluation loss": series(records, "eval_loss"),
                       "final evaluation": series(records, "validation_loss")}}
    metric = (metric or "").removeprefix("eval_")
    if metric and metric != "loss":
        found = {f"evaluation {metric}": series(records, f"eval_{metric}"),
                 "final evaluation": series(records, f"validation_{metric}")}
        if any(found.values()):
            panels[metric] = found
    return {title: {k: v for k, v in lines.items() if v} for title, lines in panels.items()
            if any(lines.values())}


def nice_ticks(lo: float, hi: float, count: int = 5, least: float = 0.0) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k apart, at least ``least``) covering [lo, hi]."""
    span = hi - lo
    raw = max(span / max(count - 1, 1), least)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.2g}"
    return f"{value:.6g}" if value == int(value) else f"{value:.4g}"


def _y_range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 or max(abs(hi) * 0.1, 0.5)
    return lo - pad, hi + pad


def _thin(points: Points) -> Points:
    if len(points) <= MAX_POINTS:
        return points
    k = math.ceil(len(points) / MAX_POINTS)
    return points[::k] + ([points[-1]] if (len(points) - 1) % k else [])


def _marker(label: str, color: str) -> str:
    """Final evaluations are rings, so an evaluation at the same step and value shows through."""
    if label.startswith("final"):
        return f'r="5" fill="none" stroke="{color}" stroke-width="2"'
    return f'r="{2 if label.startswith("training") else 3}" fill="{color}"'


def render_svg(panels: dict[str, dict[str, Points]], title: str = "") -> str:
    """The chart as SVG text: one panel per entry, sharing the step axis."""
    all_steps = [x for lines in panels.values() for points in lines.values() for x, _ in points]
    x_lo = min(all_steps + [0.0])
    last = max(all_steps + [1.0])
    x_hi = last + (last - x_lo) * 0.02  # markers on the last step stay whole
    plot_w = WIDTH - LEFT - RIGHT
    height = TOP + len(panels) * PANEL_H + (len(panels) - 1) * GAP + BOTTOM
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>',
           f'<text x="{WIDTH / 2}" y="24" text-anchor="middle" font-size="15" font-weight="bold">'
           f'{escape(title)}</text>']

    def sx(x: float) -> float:
        return LEFT + (x - x_lo) / (x_hi - x_lo) * plot_w

    for i, (name, lines) in enumerate(panels.items()):
        top = TOP + i * (PANEL_H + GAP)
        y_lo, y_hi = _y_range([y for points in lines.values() for _, y in points])

        def sy(y: float, top: float = top, y_lo: float = y_lo, y_hi: float = y_hi) -> float:
            return top + PANEL_H - (y - y_lo) / (y_hi - y_lo) * PANEL_H

        out.append(f'<g class="panel" data-panel="{escape(name)}">')
        out.append(f'<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{PANEL_H}" fill="none" stroke="#888"/>')
        for t in nice_ticks(y_lo, y_hi):
            y = sy(t)
            out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
            out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#444">{_label(t)}</text>')
        for t in nice_ticks(x_lo, last, 8, least=1.0):  # steps are whole numbers
            x = sx(t)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + PANEL_H}" stroke="#f0f0f0"/>')
            out.append(f'<text x="{x:.1f}" y="{top + PANEL_H + 16}" text-anchor="middle" fill="#444">'
                       f'{_label(t)}</text>')
        out.append(f'<text x="{LEFT + plot_w / 2}" y="{top + PANEL_H + 34}" text-anchor="middle">step</text>')
        out.append(f'<text transform="translate(18 {top + PANEL_H / 2}) rotate(-90)" text-anchor="middle">'
                   f'{escape(name)}</text>')
        for j, (label, points) in enumerate(lines.items()):
            color = COLORS["train" if label.startswith("training") else "final" if label.startswith("final")
                           else "eval"]
            points = _thin(points)
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
            out.append(f'<g class="series" data-series="{escape(label)}">')
            if not label.startswith("final"):
                out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.6"/>')
            if not label.startswith("training") or len(points) <= 60:  # few points: a marker each, value on hover
                for x, y in points:
                    out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" {_marker(label, color)}>'
                               f'<title>{escape(label)} at step {_label(x)}: {y:.4g}</title></circle>')
            out.append("</g>")
            lx, ly = LEFT + 170 * j, top - 10  # legend: one row above the panel, clear of the data
            out.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" '
                       f'stroke-width="{0 if label.startswith("final") else 2}"/>')
            if not label.startswith("training"):
                out.append(f'<circle cx="{lx + 9}" cy="{ly - 4}" {_marker(label, color)}/>')
            out.append(f'<text x="{lx + 24}" y="{ly}">{escape(label)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_training_curves(output_dir: str | Path, metric: str | None = None, title: str = "") -> Path | None:
    """Write ``<output_dir>/training_curves.svg`` from its train_log.jsonl; None when the log holds nothing to draw.
    A plot must never cost a run: any failure is logged and swallowed."""
    output_dir = Path(output_dir)
    try:
        panels = curves(read_log(output_dir / "train_log.jsonl"), metric)
        if not panels:
            return None
        target = output_dir / CURVES_FILE
        atomic_text(target, render_svg(panels, title or output_dir.name))
        return target
    except Exception as e:  # noqa: BLE001
        log.warning("could not draw %s: %s", output_dir / CURVES_FILE, e)
        return None
