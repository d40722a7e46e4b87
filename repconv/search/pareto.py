"""Pareto table and plot: latency against accuracy for searched plans and uniform policies."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Point:
    name: str
    kind: str  # original | searched | uniform | predicted
    latency_ms: float
    accuracy: float | None  # fraction (labels) or agreement with the original
    predicted_latency_ms: float | None = None
    predicted_drop: float | None = None
    budget: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """Points no other point beats on both latency (lower) and accuracy (higher), fastest first."""
    scored = [p for p in points if p.accuracy is not None]
    front = [p for p in scored if not any(
        (q.latency_ms <= p.latency_ms and q.accuracy >= p.accuracy) and
        (q.latency_ms < p.latency_ms or q.accuracy > p.accuracy) for q in scored)]
    return sorted(front, key=lambda p: p.latency_ms)


def pareto_table(points: Sequence[Point], base_latency_ms: float | None = None) -> list[dict]:
    """Rows for every point, with ``speedup`` against ``base_latency_ms`` and whether it is on the front."""
    front = {id(p) for p in pareto_front(points)}
    rows = []
    for p in sorted(points, key=lambda p: p.latency_ms):
        row = p.to_dict() | {"pareto": id(p) in front}
        if base_latency_ms:
            row["speedup"] = base_latency_ms / p.latency_ms if p.latency_ms else None
        if p.predicted_latency_ms:
            row["latency_error"] = p.predicted_latency_ms / p.latency_ms - 1
        rows.append(row)
    return rows


def plot(points: Sequence[Point], path: str | os.PathLike, *, title: str = "latency vs accuracy") -> Path:
    """Scatter of every point (markers by kind), the Pareto front as a line; written to ``path`` (png/svg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    style = {"original": ("k", "*"), "searched": ("tab:blue", "o"), "uniform": ("tab:red", "s"),
             "predicted": ("tab:gray", ".")}
    for kind, (color, marker) in style.items():
        pts = [p for p in points if p.kind == kind and p.accuracy is not None]
        if pts:
            ax.scatter([p.latency_ms for p in pts], [100 * p.accuracy for p in pts], c=color, marker=marker,
                       label=kind, s=60 if kind != "predicted" else 20, zorder=3)
            for p in pts:
                if kind != "predicted":
                    ax.annotate(p.name, (p.latency_ms, 100 * p.accuracy), fontsize=7, xytext=(4, 3),
                                textcoords="offset points")
    front = [p for p in pareto_front([p for p in points if p.kind != "predicted"])]
    if len(front) > 1:
        ax.plot([p.latency_ms for p in front], [100 * p.accuracy for p in front], "--", c="tab:blue", alpha=0.5)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
