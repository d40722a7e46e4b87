"""`repconv report` and `demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from repconv.cli import render, render_run
from repconv.cli.options import ArchOpt, JsonOpt, NumClassesOpt, TrustOpt


def report(paths: Annotated[list[Path], typer.Argument(help="a run directory holding run.json (repconv demo "
                                                       "--out) and/or search.json (repconv search -o), or your own "
                                                       "artifacts: the first is the reference")],
           output: Annotated[Path | None, typer.Option("-o", "--output", help="HTML file to write "
                                                       "(default RUN_DIR/report.html)")] = None,
           out: Annotated[Path, typer.Option("--out", help="with artifacts: the run directory to write run.json "
                                             "into")] = Path("repconv-report"),
           data: Annotated[str | None, typer.Option("--data", help="with artifacts: labeled images for accuracy "
                                                    "(digits or ROOT/CLASS/*.jpg)")] = None,
           bench: Annotated[bool, typer.Option("--bench", help="with artifacts: also measure latency")] = False,
           title: Annotated[str | None, typer.Option("--title")] = None,
           arch: ArchOpt = None, num_classes: NumClassesOpt = None, trust_pickle: TrustOpt = False,
           as_json: JsonOpt = False) -> None:
    """One self-contained HTML page of a run: plan, savings, accuracy, parity, latency (of the demo, or of your
    own artifacts, measured now), and a search's Pareto table and plot."""
    from repconv import api

    run_dir = paths[0]
    if len(paths) > 1 or not paths[0].is_dir():
        with render.status("measuring") as status:
            run_dir = api.record_run(paths, out, data=data, title=title, bench=bench, arch=arch,
                                     num_classes=num_classes, trust_pickle=trust_pickle, progress=status.update)
    result = api.report(run_dir, output)
    if as_json:
        render.emit_json(result.to_dict())
    else:
        if result.summary["stages"]:
            render_run.stages(result.summary["stages"], None, f"{result.summary['title']}")
        if result.summary["search_rows"]:
            render.out.print(f"search: {result.summary['search_rows']} Pareto rows and the plot", soft_wrap=True)
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
    render_run.stages(summary["stages"], result.latency_b1(), summary["title"])
    render.out.print(f"artifacts, run.json and report in {result.out}; open {result.report}", soft_wrap=True)
