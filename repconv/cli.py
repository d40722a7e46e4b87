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
from rich.markup import escape
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

# ---- runtime helper: `export --format engine` (TensorRT) and `predict`

BackendOpt = Annotated[str | None, typer.Option("--backend", help="torch | ort | trt (default: what the file is)")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu | cuda (default: cuda when available)")]


def _engine_options(min_batch, opt_batch, max_batch, workspace, timing_cache, opt_level, verify):
    from repconv.api import EngineOptions

    return EngineOptions(min_batch, opt_batch, max_batch, workspace, timing_cache, opt_level, verify)


@app.command()
def export(model: ModelArg,
           output: Annotated[Path, typer.Option("-o", "--output", help="output file (.onnx or .engine)")],
           fmt: Annotated[str, typer.Option("--format", help="onnx | engine (TensorRT, built from an ONNX file)")]
           = "onnx",
           dtype: Annotated[str, typer.Option("--dtype", help="fp32 | fp16 | int8 (engines: the ONNX's own)")]
           = "fp32",
           arch: ArchOpt = None, num_classes: NumClassesOpt = None, trust_pickle: TrustOpt = False,
           min_batch: Annotated[int, typer.Option("--min-batch", help="engine profile: smallest batch")] = 1,
           opt_batch: Annotated[int, typer.Option("--opt-batch", help="engine profile: batch tuned for")] = 8,
           max_batch: Annotated[int, typer.Option("--max-batch", help="engine profile: largest batch")] = 32,
           workspace: Annotated[int, typer.Option("--workspace", help="engine builder workspace limit, MiB")] = 1024,
           timing_cache: Annotated[Path | None, typer.Option("--timing-cache", help="TensorRT timing cache file "
                                                             "(read if present, written after the build)")] = None,
           opt_level: Annotated[int, typer.Option("--opt-level", help="TensorRT builder optimization level "
                                                  "0..5")] = 3,
           print_trtexec: Annotated[bool, typer.Option("--print-trtexec", help="print the equivalent trtexec "
                                                       "command line instead of building")] = False,
           no_verify: Annotated[bool, typer.Option("--no-verify", help="skip the parity check")] = False,
           as_json: JsonOpt = False) -> None:
    """Export a model: ONNX, or a TensorRT engine built from an ONNX file."""
    from repconv import api

    if fmt not in ("onnx", "engine"):
        raise click.BadParameter(f"--format must be onnx or engine, not {fmt!r}")
    if fmt == "engine":
        options = _engine_options(min_batch, opt_batch, max_batch, workspace, timing_cache, opt_level, not no_verify)
        _export_engine(model, output, options, print_trtexec, dtype=dtype, arch=arch, num_classes=num_classes,
                       trust_pickle=trust_pickle, as_json=as_json)
        return
    result = api.export(model, output, dtype=dtype, arch=arch, num_classes=num_classes,
                        trust_pickle=trust_pickle, verify=not no_verify)
    emit_json(result.to_dict()) if as_json else out.print(result)


def _export_engine(model: Path, output: Path, options, print_trtexec: bool, *, dtype: str, arch: str | None,
                   num_classes: int | None, trust_pickle: bool, as_json: bool) -> None:
    """`repconv export --format engine`: build (or, with --print-trtexec, describe) a TensorRT engine."""
    from repconv import api

    if print_trtexec:
        plan = api.engine_plan(model, output, options, dtype=dtype, arch=arch, num_classes=num_classes,
                               trust_pickle=trust_pickle)
        if as_json:
            emit_json(plan.to_dict())
            return
        if plan.onnx_first:
            err.print(f"first write the ONNX: {plan.to_dict()['onnx_first']}", soft_wrap=True)
        sys.stdout.write(plan.to_dict()["command"] + "\n")
        return
    build = api.build_engine(model, output, options)
    if as_json:
        emit_json(build.to_dict())
        return
    table = Table(title=f"TensorRT engine -> {build.engine}", title_justify="left")
    table.add_column("")
    table.add_column("value")
    table.add_row("precision (from the ONNX)", build.dtype)
    for name, s in build.shapes.items():
        table.add_row(f"profile '{name}' min/opt/max", " / ".join("x".join(map(str, s[k])) for k in ("min", "opt",
                                                                                                      "max")))
    table.add_row("TensorRT / CUDA / GPU", f"{build.versions['tensorrt']} / {build.versions['cuda']} / "
                  f"{build.versions['gpu']} (sm {build.versions['compute_capability']})")
    table.add_row("engine size", human(build.size_bytes, "B"))
    for key, fig in build.verification.items():
        table.add_row(f"vs ONNX Runtime, {key.replace('_', ' ')}", f"max abs {fig['max_abs']:.2e} "
                      f"({fig['max_rel']:.2%}), top-1 agreement {fig['top1_agreement']:.0%}")
    out.print(table)


@app.command()
def predict(artifact: Annotated[Path, typer.Argument(help="checkpoint, .onnx or .engine")],
            images: Annotated[list[Path], typer.Argument(help="image files or folders of images")],
            top_k: Annotated[int, typer.Option("--top-k", help="classes shown per image")] = 5,
            backend: BackendOpt = None, device: DeviceOpt = None, arch: ArchOpt = None,
            num_classes: NumClassesOpt = None, trust_pickle: TrustOpt = False, as_json: JsonOpt = False) -> None:
    """Top-k classes per image with any checkpoint, ONNX file or TensorRT engine."""
    from repconv import api

    result = api.predict(artifact, images, top_k=top_k, backend=backend, device=device, arch=arch,
                         num_classes=num_classes, trust_pickle=trust_pickle)
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    if as_json:
        emit_json(result.to_dict())
        return
    k = max((len(p.top) for p in result.predictions), default=0)
    table = Table(title=escape(f"{artifact.name} [{result.backend}, {result.device}]"), title_justify="left")
    table.add_column("image", overflow="fold")
    for rank in range(1, k + 1):
        table.add_column(f"#{rank}")
    for p in result.predictions:
        table.add_row(p.path, *[f"{s.label if s.label is not None else s.index} ({s.probability:.3f})"
                                for s in p.top])
    out.print(table)


# ---------------------------------------------------------------- see it (issue 5: bench, demo, report)

# ---- runtime helper: `bench`


@app.command()
def bench(artifacts: Annotated[list[Path], typer.Argument(help="checkpoints, .onnx files and .engine files; "
                                                          "the first is the baseline")],
          batch: Annotated[str, typer.Option("--batch", help="batch sizes, comma-separated")] = "1,8,32",
          size: Annotated[int | None, typer.Option("--size", help="image side (default: the first artifact's "
                                                   "input size)")] = None,
          backend: Annotated[str | None, typer.Option("--backend", help="backends to run each artifact on, "
                                                      "comma-separated: torch,ort,trt (default: its own)")] = None,
          device: DeviceOpt = None,
          warmup: Annotated[int, typer.Option("--warmup", help="untimed runs first")] = 3,
          repeats: Annotated[int, typer.Option("--repeats", help="timed runs per batch size")] = 20,
          max_seconds: Annotated[float, typer.Option("--max-seconds", help="time budget per artifact and "
                                                     "batch size (at least 3 runs)")] = 10.0,
          threads: Annotated[int | None, typer.Option("--threads", help="CPU threads (torch and ONNX "
                                                      "Runtime alike)")] = None,
          arch: ArchOpt = None, num_classes: NumClassesOpt = None, trust_pickle: TrustOpt = False,
          json_out: Annotated[Path | None, typer.Option("--json-out", help="also write the full JSON report "
                                                        "to this file")] = None,
          plot: Annotated[Path | None, typer.Option("--plot", help="write a latency/throughput plot "
                                                    "(.png, .svg or .pdf)")] = None,
          as_json: JsonOpt = False) -> None:
    """Latency, throughput, size and memory of artifacts side by side, in one process, on the same inputs."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from repconv import api
    from repconv.runtime.bench import parse_batches

    batches = parse_batches(batch)
    backends = [b.strip() for b in backend.split(",") if b.strip()] if backend else None
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=err, transient=True)
    task = bar.add_task("bench", total=None)

    def progress(message: str, done: int, total: int) -> None:
        bar.start()  # only once measuring begins, so that an early one-line error stays one line
        bar.update(task, description=message, completed=done, total=total)

    try:
        report = api.bench(artifacts, batches=batches, size=size, backends=backends, device=device, warmup=warmup,
                           repeats=repeats, max_seconds=max_seconds, threads=threads, arch=arch,
                           num_classes=num_classes, trust_pickle=trust_pickle, json_out=json_out, plot=plot,
                           progress=progress)
    finally:
        bar.stop()
    if as_json:
        emit_json(report.to_dict())
    else:
        _render_bench(report)
    for path, what in ((json_out, "JSON report"), (plot, "plot")):
        if path is not None:
            err.print(f"{what} -> {path}")


def _render_bench(report) -> None:
    base = report.targets[0]
    models = Table(title=f"Artifacts (baseline: {report.baseline})", title_justify="left")
    for col in ("artifact", "backend", "dtype", "params", "MACs / image", "file", "peak memory", "load",
                "max |Δ| vs baseline", "top-1 agree"):
        models.add_column(col, justify="left" if col in ("artifact", "backend", "dtype") else "right")
    for r in report.targets:
        models.add_row(r.label, f"{r.backend} ({r.device})", r.dtype,
                       human(r.params) if r.params is not None else "-",
                       human(r.macs) if r.macs is not None else "-", human(r.file_bytes, "B"),
                       human(r.peak_memory_bytes, "B"), f"{r.load_seconds:.2f}s",
                       "baseline" if r is base else (f"{r.max_abs_diff_vs_baseline:.2e}"
                                                     if r.max_abs_diff_vs_baseline is not None else "-"),
                       "" if r is base else (f"{r.top1_agreement_vs_baseline:.0%}"
                                             if r.top1_agreement_vs_baseline is not None else "-"))
    out.print(models)
    latency = Table(title=f"Latency at {report.options['size']}px, {report.machine['torch_threads']} threads "
                    f"({report.machine['cpu']}, load {report.machine['load_average'][0]:.1f})"
                    if report.machine.get("load_average") else "Latency", title_justify="left")
    for col in ("artifact", "backend", "batch", "median ms", "p90 ms", "images/s", "speed-up"):
        latency.add_column(col, justify="left" if col in ("artifact", "backend") else "right")
    for r in report.targets:
        for t in r.timings:
            latency.add_row(r.label, r.backend, str(t.batch), f"{t.median_ms:.2f}", f"{t.p90_ms:.2f}",
                            f"{t.throughput:.1f}", f"{t.speedup:.2f}x" if t.speedup else "-")
        for b, why in r.skipped.items():
            latency.add_row(r.label, r.backend, b, "-", "-", "-", f"skipped: {why}")
    out.print(latency)



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
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
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
