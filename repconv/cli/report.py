"""`repconv report` and `demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from repconv.cli import render
from repconv.cli.options import JsonOpt


def report(run_dir: Annotated[Path, typer.Argument(help="run directory holding run.json (e.g. repconv demo --out)")],
           output: Annotated[Path | None, typer.Option("-o", "--output", help="HTML file to write "
                                                       "(default RUN_DIR/report.html)")] = None,
           as_json: JsonOpt = False) -> None:
    """One self-contained HTML page from a run directory: plan, savings, accuracy, parity, latency."""
    from repconv import api

    result = api.report(run_dir, output)
    if as_json:
        render.emit_json(result.to_dict())
    else:
        render.stages(result.summary["stages"], None, f"{result.summary['title']}")
        render.out.print(f"report: {result.path}", soft_wrap=True)


def demo(out: Annotated[Path, typer.Option("--out", help="folder for the artifacts, run.json and "
                                               "report.html (a trained model there is reused)")] = Path("repconv-demo"),
         quick: Annotated[bool, typer.Option("--quick", help="fewer epochs and bench runs (CI)")] = False,
         as_json: JsonOpt = False) -> None:
    """The whole pipeline offline on the bundled digits data: train, convert, recover, fold, export, bench."""
    from repconv import api

    result = api.demo(out, quick=quick, progress=True, say=render.note)
    summary = result.to_dict()
    if as_json:
        render.emit_json(summary)
        return
    render.stages(summary["stages"], result.latency_b1(), summary["title"])
    render.out.print(f"artifacts, run.json and report in {result.out}; open {result.report}", soft_wrap=True)
