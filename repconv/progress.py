"""Progress a person can follow: a rich bar in a terminal, and plain timestamped lines every few seconds
otherwise (output piped to a file or a log, CI), each with the step, the figures and an ETA.

Both are used the same way: ``with progress(enabled) as bar: task = bar.add_task(...); bar.update(task, ...)``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

LINE_SECONDS = float(os.environ.get("REPCONV_PROGRESS_SECONDS", "10"))


class Lines:
    """The rich ``Progress`` subset the loops use, as a line on stderr at most every ``every`` seconds."""

    def __init__(self, every: float = LINE_SECONDS, stream=None):
        self.every, self.stream = every, stream or sys.stderr
        self.tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc) -> None:
        for task_id in self.tasks:
            self._line(task_id, final=True)

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        task_id = len(self.tasks)
        now = time.monotonic()
        self.tasks[task_id] = {"description": description, "total": total, "completed": 0, "start": now,
                               "last": now, "fields": fields, "done": False}
        return task_id

    def update(self, task_id: int, *, advance: float = 0, description: str | None = None, **fields) -> None:
        task = self.tasks[task_id]
        task["completed"] += advance
        task["fields"].update(fields)
        if description:
            task["description"] = description
        now = time.monotonic()
        if now - task["last"] >= self.every:
            task["last"] = now
            self._line(task_id)

    def _line(self, task_id: int, final: bool = False) -> None:
        task = self.tasks[task_id]
        if task["done"]:
            return
        task["done"] = final
        elapsed = time.monotonic() - task["start"]
        done, total = task["completed"], task["total"]
        step = f"{done:.0f}/{total:.0f}" if total else f"{done:.0f}"
        eta = ""
        if total and 0 < done < total:
            eta = f", ETA {_duration(elapsed * (total - done) / done)}"
        stats = " ".join(str(v) for v in task["fields"].values() if v)
        self.stream.write(f"[{_duration(elapsed)}] {task['description']}: {step} {stats}{eta}"
                          f"{' (done)' if final and total and done >= total else ''}\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress(enabled: bool, *columns: Any):
    """A rich bar (``columns``: rich progress columns) in a terminal, :class:`Lines` otherwise; a no-op
    ``Lines`` with no output when not ``enabled``."""
    if not enabled:
        return Lines(every=float("inf"), stream=_Null())
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import Progress

        return Progress(*columns, console=Console(stderr=True), transient=False)
    return Lines()


class _Null:
    def write(self, _text: str) -> None:
        pass

    def flush(self) -> None:
        pass
