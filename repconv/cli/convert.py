"""`repconv inspect`, `convert` and `models`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from repconv.cli import render
from repconv.cli.options import (
    ArchOpt,
    JsonOpt,
    LeafOpt,
    MeanOpt,
    ModelArg,
    NumClassesOpt,
    OutOpt,
    RemapOpt,
    RemapRulesOpt,
    SizeOpt,
    StdOpt,
    TrustOpt,
)
from repconv.options import Init, Method, PfOp, PfPolicy, Select

MethodOpt = Annotated[Method, typer.Option("--method", help="replacement | parameter-free | both")]
EveryOpt = Annotated[int, typer.Option("--every", help="replace every K-th interior member of each run (K >= 2)")]
UnitsOpt = Annotated[list[str] | None, typer.Option("--units", help="replace exactly these units (globs); "
                                                    "repeatable")]
MaxFracOpt = Annotated[float | None, typer.Option("--max-fraction", help="replace at most this share of "
                                                  "the parameters")]
InitOpt = Annotated[Init, typer.Option("--init", help="initial scalars: half (0.5, 0.5) or lstsq "
                                       "(weight-space least squares)")]
NeighborGradOpt = Annotated[bool, typer.Option("--neighbor-grad", help="let gradients flow into the "
                                               "neighbours through the synthesis (default: detached)")]
PlanOpt = Annotated[Path | None, typer.Option("--plan", help="apply this plan (JSON) instead of choosing")]
PfPolicyOpt = Annotated[PfPolicy, typer.Option("--pf-policy", help="parameter-free targets: all | hybrid")]
PfOpOpt = Annotated[PfOp, typer.Option("--pf-op", help="parameter-free operation: max | avg")]
PfUnitsOpt = Annotated[list[str] | None, typer.Option("--pf-units", help="parameter-free targets "
                                                      "(globs); repeatable")]
SelectOpt = Annotated[Select, typer.Option("--select", help="position (--every/--units) | measured (least KL "
                                           "damage on --data, up to --budget units)")]
BudgetOpt = Annotated[int | None, typer.Option("--budget", help="max replaced units with --select measured")]
CalibDataOpt = Annotated[str | None, typer.Option("--data", help="calibration data for --select measured: "
                                                  "digits or a folder")]


def _options(values: dict):
    from repconv.api import ConvertOptions
    from repconv.options import from_values

    return from_values(ConvertOptions, values)


def inspect(model: ModelArg, arch: ArchOpt = None, num_classes: NumClassesOpt = None,
            method: MethodOpt = "replacement", every: EveryOpt = 2, units: UnitsOpt = None,
            max_fraction: MaxFracOpt = None, init: InitOpt = "half", neighbor_grad: NeighborGradOpt = False,
            plan: PlanOpt = None, leaves: LeafOpt = None, pf_policy: PfPolicyOpt = "all", pf_op: PfOpOpt = "max",
            pf_units: PfUnitsOpt = None, trust_pickle: TrustOpt = False, remap: RemapOpt = None,
            remap_rules: RemapRulesOpt = None,
            candidates: Annotated[Path | None, typer.Option("--candidates", help="also show a candidate table "
                                                            "`repconv search` measured (its JSON file)")] = None,
            as_json: JsonOpt = False) -> None:
    """What can be replaced and what the options would save (writes nothing)."""
    from repconv import api

    table = api.load_table(candidates) if candidates is not None else None

    s = api.inspect(model, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle, remap=remap,
                    remap_rules=remap_rules, options=_options(locals()))
    if as_json:
        render.emit_json({**s.to_dict(), "candidates": table.to_dict() if table else None})
        return
    render.summary(s, f"{s.arch or model.name}: what `convert` would do")
    if table is not None:
        render.candidates(table)


def convert(model: ModelArg, output: OutOpt, arch: ArchOpt = None, num_classes: NumClassesOpt = None,
            method: MethodOpt = "replacement", every: EveryOpt = 2, units: UnitsOpt = None,
            max_fraction: MaxFracOpt = None, init: InitOpt = "half", neighbor_grad: NeighborGradOpt = False,
            plan: PlanOpt = None, leaves: LeafOpt = None, pf_policy: PfPolicyOpt = "all", pf_op: PfOpOpt = "max",
            pf_units: PfUnitsOpt = None,
            plan_out: Annotated[Path | None, typer.Option("--plan-out", help="also write the plan as JSON")] = None,
            select: SelectOpt = "position", budget: BudgetOpt = None, data: CalibDataOpt = None,
            input_size: SizeOpt = None, mean: MeanOpt = None, std: StdOpt = None,
            trust_pickle: TrustOpt = False, remap: RemapOpt = None, remap_rules: RemapRulesOpt = None,
            as_json: JsonOpt = False) -> None:
    """Rewrite a checkpoint into the Replacement Learning and/or parameter-free form."""
    from repconv import api

    result = api.convert(model, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle, remap=remap,
                         remap_rules=remap_rules, output=output,
                         plan_output=plan_out, input_size=input_size, mean=mean, std=std,
                         options=_options(locals()))
    if as_json:
        render.emit_json({**result.summary.to_dict(), "output": str(output)})
    else:
        render.summary(result.summary, f"{result.summary.arch}: converted -> {output}")


def models(source: Annotated[str | None, typer.Option(help="repconv | torchvision | timm")] = None,
           as_json: JsonOpt = False) -> None:
    """List the architecture names --arch accepts."""
    from repconv import api

    names = api.list_models()
    if source:
        names = {source: names.get(source, [])}
    if as_json:
        render.emit_json(names)
        return
    for src, items in names.items():
        render.out.print(f"[bold]{src}[/] ({len(items)}): " + ", ".join(items[:200])
                         + (" ..." if len(items) > 200 else ""), soft_wrap=True)
