"""`repconv search`: what to convert, chosen under a latency or accuracy budget, measured."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from repconv.cli import render, render_run
from repconv.cli.options import ArchOpt, JsonOpt, ModelArg, NumClassesOpt, TrustOpt, parse_ints
from repconv.options import Device, Refit

TARGETS = "ort-cpu | ort-cuda | tensorrt | torch-nchw | torch-channels-last"


def search(model: ModelArg,
           data: Annotated[str, typer.Option("--data", help="images to distill on and score candidates with: "
                                             "digits or a folder (labels unused)")],
           output: Annotated[Path, typer.Option("-o", "--output", help="folder for the searched checkpoint, "
                                                "search.json, the candidate table and pareto.png")],
           latency_budget: Annotated[float | None, typer.Option("--latency-budget", help="target latency as a "
                                                                "fraction of the original's, e.g. 0.8")] = None,
           max_drop: Annotated[float | None, typer.Option("--max-drop", help="accuracy points (agreement with the "
                                                          "original) you accept to lose, e.g. 1")] = None,
           target: Annotated[str, typer.Option("--target", help=f"where latency is measured: {TARGETS}")] = "ort-cpu",
           val_data: Annotated[str | None, typer.Option("--val-data", help="held-out images (default: a split of "
                                                        "--data)")] = None,
           cache: Annotated[Path | None, typer.Option("--cache", help="candidate table file (default: in the "
                                                      "output folder); reused when model, data and target match")]
           = None,
           refresh: Annotated[bool, typer.Option("--refresh", help="rebuild the candidate table")] = False,
           resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted search")] = False,
           threads: Annotated[int, typer.Option("--threads", help="CPU threads for latency")] = 2,
           device: Annotated[Device, typer.Option("--device", help="cpu | cuda: where the candidates, the refit and "
                                                  "the local stage train and torch targets run")] = "cpu",
           latency_checks: Annotated[int, typer.Option("--latency-checks", help="with --latency-budget: assembled "
                                                       "plans timed after the first to meet the budget (0: keep the "
                                                       "table's plan)")] = 3,
           refit: Annotated[Refit, typer.Option("--refit", help="least-squares refit of the layer after each new "
                                                "pool (as calibrate does): on | off | auto (the refitted and the "
                                                "converted model race in the global stage; the better goes "
                                                "on)")] = "auto",
           race_plans: Annotated[int, typer.Option("--race-plans", help="with --latency-budget: the most plans "
                                                   "that race in the global stage (the table's plan, the --rival "
                                                   "policies that meet the budget when timed, other timed plans "
                                                   "that met it); 1: the table's plan alone")] = 3,
           race_epochs: Annotated[str, typer.Option("--race-epochs", help="the race's rungs, comma-separated: "
                                                    "every start trains to the first, the better half go on to the "
                                                    "next (1,3: successive halving), the best continues the global "
                                                    "stage")] = "1",
           rivals: Annotated[str | None, typer.Option("--rivals", help="uniform policies the table's plan races "
                                                      "where they meet the budget, comma-separated (default: "
                                                      "pf-hybrid,pf-all,replace-every-2)")] = None,
           local_epochs: Annotated[int, typer.Option("--local-epochs", help="block-wise (local) distillation "
                                                     "epochs of the assembled model before the global stage; 0 (the "
                                                     "default) skips it")] = 0,
           global_epochs: Annotated[int, typer.Option("--global-epochs", help="distillation epochs of the "
                                                      "assembled model (logits); 0 skips the stage")] = 3,
           global_lr: Annotated[float, typer.Option("--global-lr", help="learning rate of the global stage")] = 3e-3,
           batches_per_epoch: Annotated[int | None, typer.Option("--batches-per-epoch", help="cap (quick runs)")]
           = None,
           arch: ArchOpt = None, num_classes: NumClassesOpt = None, trust_pickle: TrustOpt = False,
           as_json: JsonOpt = False) -> None:
    """Measure each unit's candidates (damage, latency), choose the fastest plan within the budget (an integer
    program), convert, distill and verify predicted against measured."""
    from repconv import api
    from repconv.options import from_values

    values = {**locals(), "local": api.LocalOptions(epochs=local_epochs)}
    if rivals is None:
        values.pop("rivals")
    else:
        values["rivals"] = tuple(r.strip() for r in rivals.split(",") if r.strip())
    values["race_epochs"] = parse_ints(race_epochs, "race_epochs", "1,3")
    options = from_values(api.SearchOptions, values)
    with render.status("searching") as status:
        result = api.search(model, data, output, latency_budget=latency_budget, max_drop=max_drop, options=options,
                            val_data=val_data, cache=cache, refresh=refresh, resume=resume, progress=status.update,
                            arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)
    if as_json:
        render.emit_json(result.to_dict())
    else:
        render_run.searched(result)
