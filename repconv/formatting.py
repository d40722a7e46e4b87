"""Numbers as people read them: one definition shared by the CLI's tables and the HTML report."""

from __future__ import annotations


def human(n: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M'; None -> '-'."""
    if n is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def human_bytes(n: int | None) -> str:
    """Binary units: 1536 -> '1.50 KiB'."""
    if n is None:
        return "-"
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n} B"


def ratio(before: float | None, after: float | None) -> str:
    """'0.55x', or '-' when either is missing."""
    return f"{after / before:.2f}x" if before and after is not None else "-"


def pct(x: float | None, digits: int = 2) -> str:
    """0.9123 -> '91.23%'; None -> '-'."""
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def race_summary(race: dict) -> str:
    """A race of starts (``repconv.train.race.RaceResult.to_dict()``) in one line: 'val_acc after 1 epoch: a
    73.61%, b 32.41%; after 3 epochs: a 92.59%, b 94.91%' (a record without rounds: its final scores)."""
    rounds = race.get("rounds") or [{"epochs": race.get("epochs"), "scores": race.get("scores") or {}}]
    parts = [f"after {r['epochs']} epoch{'' if r['epochs'] == 1 else 's'}: "
             + ", ".join(f"{name} {pct(v)}" for name, v in r["scores"].items()) for r in rounds]
    return f"{race.get('metric')} " + "; ".join(parts)
