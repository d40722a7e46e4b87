"""The `repconv` command: parse, call repconv.api, render with rich. No logic of its own.

Conventions every command follows: results go to stdout (a rich table, or one JSON object with
``--json``); progress and notes go to stderr; a RepconvError prints one line and exits 2
(``--debug`` anywhere on the command line adds the traceback).
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table

from repconv.errors import RepconvError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Replacement Learning and parameter-free layers for "
                  "pretrained PyTorch vision models: convert, recover, fold, export, run.")
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

# ---------------------------------------------------------------- shared options

ModelArg = Annotated[Path, typer.Argument(help="checkpoint: .pt/.pth state_dict, .safetensors or a repconv file")]
ArchOpt = Annotated[str | None, typer.Option("--arch", help="architecture when the file holds only weights "
                                             "(repconv, torchvision or timm name; prefix torchvision: or timm:)")]
NumClassesOpt = Annotated[int | None, typer.Option("--num-classes", help="default: what the classifier "
                                                   "weights in the file say")]
TrustOpt = Annotated[bool, typer.Option("--trust-pickle", help="allow loading a pickled nn.Module "
                                        "(runs code from the file: only for files you trust)")]
LeafOpt = Annotated[list[str] | None, typer.Option("--leaf", help="module path to keep opaque (not traced "
                                                   "into, not rewritten); repeatable")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout instead of tables")]


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def ratio(before: float, after: float) -> str:
    return f"{after / before:.2f}x" if before else "-"


# ---------------------------------------------------------------- convert / inspect (foundation)


def _render_summary(s, title: str) -> None:
    if s.runs:
        runs = Table(title="Repeated units (runs)", title_justify="left")
        for col in ("container", "members", "interior (replaceable)", "params / unit"):
            runs.add_column(col)
        for r in s.runs:
            members = r["members"]
            shown = ", ".join(m.rsplit(".", 1)[-1] for m in members)
            runs.add_row(r["container"], f"{len(members)}: {shown}",
                         ", ".join(m.rsplit(".", 1)[-1] for m in r["interior"]) or "-",
                         human(r["params_per_member"]))
        out.print(runs)
    if s.steps:
        steps = Table(title="Plan", title_justify="left")
        for col in ("step", "module", "from / op", "init", "a", "b", "weight-space fit error"):
            steps.add_column(col)
        for st in s.steps:
            if st["kind"] == "replace":
                fit = "-" if st.get("fit_error") is None else f"{st['fit_error']:.1%}"
                steps.add_row("replace", st["unit"], f"{st['prev']} + {st['next']}", st["init"],
                              f"{st['a']:.4f}", f"{st['b']:.4f}", fit)
            else:
                steps.add_row("parameter-free", st["target"], f"{st['form']}:{st['op']}{st['kernel']}"
                              f"/s{st['stride']}", "-", "-", "-", "-")
        out.print(steps)
    table = Table(title=title, title_justify="left")
    for col in ("", "before", "after", "ratio"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("parameters", human(s.params_before), human(s.params_after), ratio(s.params_before, s.params_after))
    table.add_row("trainable parameters", human(s.params_before), human(s.trainable_params),
                  ratio(s.params_before, s.trainable_params))
    table.add_row(f"MACs @ {s.input_size[1]}x{s.input_size[2]}", human(s.macs_before), human(s.macs_after),
                  ratio(s.macs_before, s.macs_after))
    table.add_row("replaced units", "", str(len(s.replaced_units)), "")
    out.print(table)
    if s.opaque_modules:
        err.print(f"opaque (not rewritten): {', '.join(s.opaque_modules)}")
    if s.message:
        err.print(f"[yellow]nothing to convert:[/] {s.message}")


ConvertOptions = dict


def _convert_options(method, every, units, max_fraction, init, neighbor_grad, plan, leaf,
                     pf_policy, pf_op, pf_units) -> ConvertOptions:
    return dict(method=method, every=every, units=units or None, max_fraction=max_fraction, init=init,
                neighbor_grad=neighbor_grad, plan=plan, leaves=leaf or (), pf_policy=pf_policy, pf_op=pf_op,
                pf_units=pf_units or None)


MethodOpt = Annotated[str, typer.Option("--method", help="replacement | parameter-free | both")]
EveryOpt = Annotated[int, typer.Option("--every", help="replace every K-th interior member of each run (K >= 2)")]
UnitsOpt = Annotated[list[str] | None, typer.Option("--units", help="replace exactly these units (globs); "
                                                    "repeatable")]
MaxFracOpt = Annotated[float | None, typer.Option("--max-fraction", help="replace at most this share of "
                                                  "the parameters")]
InitOpt = Annotated[str, typer.Option("--init", help="initial scalars: half (0.5, 0.5) or lstsq "
                                      "(weight-space least squares)")]
NeighborGradOpt = Annotated[bool, typer.Option("--neighbor-grad", help="let gradients flow into the "
                                               "neighbours through the synthesis (default: detached)")]
PlanOpt = Annotated[Path | None, typer.Option("--plan", help="apply this plan (JSON) instead of choosing")]
PfPolicyOpt = Annotated[str, typer.Option("--pf-policy", help="parameter-free targets: all | hybrid")]
PfOpOpt = Annotated[str, typer.Option("--pf-op", help="parameter-free operation: max | avg")]
PfUnitsOpt = Annotated[list[str] | None, typer.Option("--pf-units", help="parameter-free targets "
                                                      "(globs); repeatable")]


@app.command()
def inspect(model: ModelArg, arch: ArchOpt = None, num_classes: NumClassesOpt = None,
            method: MethodOpt = "replacement", every: EveryOpt = 2, units: UnitsOpt = None,
            max_fraction: MaxFracOpt = None, init: InitOpt = "half", neighbor_grad: NeighborGradOpt = False,
            plan: PlanOpt = None, leaf: LeafOpt = None, pf_policy: PfPolicyOpt = "all", pf_op: PfOpOpt = "max",
            pf_units: PfUnitsOpt = None, trust_pickle: TrustOpt = False, as_json: JsonOpt = False) -> None:
    """What can be replaced and what the options would save (writes nothing)."""
    from repconv import api

    s = api.inspect(model, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle,
                    **_convert_options(method, every, units, max_fraction, init, neighbor_grad, plan, leaf,
                                       pf_policy, pf_op, pf_units))
    if as_json:
        emit_json(s.to_dict())
    else:
        _render_summary(s, f"{s.arch or model.name}: what `convert` would do")


@app.command()
def convert(model: ModelArg,
            output: Annotated[Path, typer.Option("-o", "--output", help="output file (*.repconv.safetensors)")],
            arch: ArchOpt = None, num_classes: NumClassesOpt = None,
            method: MethodOpt = "replacement", every: EveryOpt = 2, units: UnitsOpt = None,
            max_fraction: MaxFracOpt = None, init: InitOpt = "half", neighbor_grad: NeighborGradOpt = False,
            plan: PlanOpt = None, leaf: LeafOpt = None, pf_policy: PfPolicyOpt = "all", pf_op: PfOpOpt = "max",
            pf_units: PfUnitsOpt = None,
            plan_out: Annotated[Path | None, typer.Option("--plan-out", help="also write the plan as JSON")] = None,
            trust_pickle: TrustOpt = False, as_json: JsonOpt = False) -> None:
    """Rewrite a checkpoint into the Replacement Learning and/or parameter-free form."""
    from repconv import api
    from repconv.checkpoint import write_text_atomic

    result = api.convert(model, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle, output=output,
                         **_convert_options(method, every, units, max_fraction, init, neighbor_grad, plan,
                                            leaf, pf_policy, pf_op, pf_units))
    if plan_out:
        write_text_atomic(plan_out, result.plan.to_json())
    s = result.summary.to_dict()
    s["output"] = str(output)
    if as_json:
        emit_json(s)
    else:
        _render_summary(result.summary, f"{result.summary.arch}: converted -> {output}")


@app.command("models")
def models_(source: Annotated[str | None, typer.Option(help="repconv | torchvision | timm")] = None,
            as_json: JsonOpt = False) -> None:
    """List the architecture names --arch accepts."""
    from repconv.models import list_models

    names = list_models()
    if source:
        names = {source: names.get(source, [])}
    if as_json:
        emit_json(names)
        return
    for src, items in names.items():
        out.print(f"[bold]{src}[/] ({len(items)}): " + ", ".join(items[:200]) + (" ..." if len(items) > 200 else ""))


# ---------------------------------------------------------------- train (issue 3: calibrate, finetune, train)

# ---------------------------------------------------------------- deploy (issue 4: fold, export, predict)

# ---------------------------------------------------------------- see it (issue 5: bench, demo, report)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="run directory holding run.json (e.g. repconv demo --out)")],
           output: Annotated[Path | None, typer.Option("-o", "--output", help="HTML file to write "
                                                       "(default RUN_DIR/report.html)")] = None,
           as_json: JsonOpt = False) -> None:
    """One self-contained HTML page from a run directory: plan, savings, accuracy, parity, latency."""
    from repconv import api

    result = api.report(run_dir, output)
    if as_json:
        emit_json(result.to_dict())
    else:
        _render_stages(result.summary["stages"], None, f"{result.summary['title']}")
        out.print(f"report: {result.path}")


def _render_stages(stages: list[dict], latency: dict[str, float] | None, title: str) -> None:
    table = Table(title=title, title_justify="left")
    cols = ["stage", "val accuracy", "params", "trainable params", "MACs", "file size"]
    if latency is not None:
        cols.append("latency b1 (ms)")
    for col in cols:
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in stages:
        row = [s["name"], "-" if s["val_acc"] is None else f"{100 * s['val_acc']:.2f}%",
               "-" if s["params"] is None else human(s["params"]),
               "-" if s["trainable_params"] is None else human(s["trainable_params"]),
               "-" if s["macs"] is None else human(s["macs"]),
               "-" if s["file_size"] is None else human(s["file_size"], "B")]
        if latency is not None:
            ms = latency.get(s["name"])
            row.append("-" if ms is None else f"{ms:.3f}")
        table.add_row(*row)
    out.print(table)


@app.command()
def demo(out_dir: Annotated[Path, typer.Option("--out", help="folder for the artifacts, run.json and "
                                               "report.html (a trained model there is reused)")] = Path("repconv-demo"),
         quick: Annotated[bool, typer.Option("--quick", help="fewer epochs and bench runs (CI)")] = False,
         as_json: JsonOpt = False) -> None:
    """The whole pipeline offline on the bundled digits data: train, convert, recover, fold, export, bench."""
    from repconv import api

    result = api.demo(out_dir, quick=quick, progress=True, say=lambda m: err.print(m, markup=False, highlight=False,
                                                                         soft_wrap=True))
    summary = result.to_dict()
    if as_json:
        emit_json(summary)
        return
    _render_stages(summary["stages"], result.latency_b1(), summary["title"])
    if result.missing:
        err.print(f"[yellow]not run (missing from this build):[/] {', '.join(result.missing)}")
    out.print(f"artifacts, run.json and report in {result.out}; open {result.report}")


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        app(args=args, prog_name="repconv", standalone_mode=False)
    except RepconvError as exc:
        if debug:
            traceback.print_exc()
        err.print(f"[red]error:[/] {exc}", soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        else:
            err.print(f"[red]internal error:[/] {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                      soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
