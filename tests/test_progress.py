"""Progress without a terminal: plain lines with the step, the figures and an ETA (logs, pipes, CI)."""

from __future__ import annotations

import io

from repconv.progress import Lines


def test_lines_report_step_figures_and_eta():
    stream = io.StringIO()
    with Lines(every=0.0, stream=stream) as bar:
        task = bar.add_task("epoch 1/3", total=4, stats="")
        for i in range(4):
            bar.update(task, advance=1, stats=f"loss {1 / (i + 1):.2f}")
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("ETA 0s") and "epoch 1/3: 1/4 loss 1.00" in lines[0]
    assert lines[-1].endswith("(done)") and "4/4 loss 0.25" in lines[-1]


def test_lines_are_rate_limited():
    stream = io.StringIO()
    with Lines(every=3600, stream=stream) as bar:
        task = bar.add_task("epoch 1/1", total=100, stats="")
        for _ in range(100):
            bar.update(task, advance=1)
    assert len(stream.getvalue().splitlines()) == 1  # the closing line only
