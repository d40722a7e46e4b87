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
        for col in ("container", "members", "interior (replaceable)", "params / unit", "activation"):
            runs.add_column(col)
        for r in s.runs:
            members = r["members"]
            shown = ", ".join(m.rsplit(".", 1)[-1] for m in members)
            runs.add_row(r["container"], f"{len(members)}: {shown}",
                         ", ".join(m.rsplit(".", 1)[-1] for m in r["interior"]) or "-",
                         human(r["params_per_member"]),
                         "x".join(map(str, r["output_shape"][1:])) if r.get("output_shape") else "-")
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
    _render_parameter_free(s)
    if s.opaque_modules:
        err.print(f"opaque (not rewritten): {', '.join(s.opaque_modules)}")
    if s.message:
        err.print(f"[yellow]nothing to convert:[/] {s.message}")


def _render_parameter_free(s) -> None:
    if not s.parameter_free_targets:
        return
    targets = Table(title="Parameter-free targets", title_justify="left")
    for col in ("target", "kind", "k/s", "params", "absorbs", "all", "hybrid"):
        targets.add_column(col)
    for t in s.parameter_free_targets:
        absorbs = ", ".join(a.rsplit(".", 1)[-1] for a in t["absorbed"]) or "-"
        targets.add_row(t["target"], t["kind"], f"{t['kernel']}/{t['stride']}", human(t["params"]), absorbs,
                        t["all"], t["hybrid"])
    out.print(targets)
    policies = Table(title="What each parameter-free policy would leave", title_justify="left")
    for col in ("policy", "steps", "parameters", "ratio", f"MACs @ {s.input_size[1]}x{s.input_size[2]}", "ratio"):
        policies.add_column(col, justify="left" if col == "policy" else "right")
    for p in s.parameter_free_policies:
        policies.add_row(p["policy"], str(p["steps"]), human(p["params_after"]),
                         ratio(s.params_before, p["params_after"]), human(p["macs_after"]),
                         ratio(s.macs_before, p["macs_after"]))
    out.print(policies)


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
            select: Annotated[str, typer.Option("--select", help="position (--every/--units) | measured (least "
                                                "KL damage on --data, up to --budget units)")] = "position",
            budget: Annotated[int | None, typer.Option("--budget", help="max replaced units with --select "
                                                       "measured")] = None,
            data: Annotated[str | None, typer.Option("--data", help="calibration data for --select measured: "
                                                     "digits or a folder")] = None,
            trust_pickle: TrustOpt = False, as_json: JsonOpt = False) -> None:
    """Rewrite a checkpoint into the Replacement Learning and/or parameter-free form."""
    from repconv import api
    from repconv.checkpoint import write_text_atomic

    result = api.convert(model, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle, output=output,
                         select=select, budget=budget, data=data,
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

DataOpt = Annotated[str, typer.Option("--data", help="'digits' (bundled, no download), an ImageFolder tree "
                                      "(ROOT/CLASS/*.jpg; ROOT/train and ROOT/val when present) or a folder of "
                                      "unlabeled images (distillation)")]
ValDataOpt = Annotated[str | None, typer.Option("--val-data", help="labeled validation images (default: the "
                                                "data's own val split when it has one)")]
TeacherOpt = Annotated[Path | None, typer.Option("--teacher", help="the original checkpoint (any file repconv "
                                                 "loads)")]
OutOpt = Annotated[Path, typer.Option("-o", "--output", help="output file (*.repconv.safetensors)")]
SizeOpt = Annotated[int | None, typer.Option("--input-size", help="square input size (default: the model's)")]
MeanOpt = Annotated[list[float] | None, typer.Option("--mean", help="normalization mean, 3 values (default: the "
                                                     "model's)")]
StdOpt = Annotated[list[float] | None, typer.Option("--std", help="normalization std, 3 values (default: the "
                                                    "model's)")]
EpochsOpt = Annotated[int, typer.Option("--epochs")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="per process")]
SeedOpt = Annotated[int, typer.Option("--seed")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue from OUTPUT.state.pt (epoch boundary)")]
BatchesOpt = Annotated[int | None, typer.Option("--batches-per-epoch", help="cap the batches of an epoch")]
AccumOpt = Annotated[int, typer.Option("--accum", help="gradient accumulation steps")]
AmpOpt = Annotated[str, typer.Option("--amp", help="auto (fp16/bf16 on CUDA, off on CPU) | on | off")]
WarmupOpt = Annotated[float, typer.Option("--warmup-epochs", help="linear warmup, then cosine decay")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="DataLoader worker processes")]


def _is_rank0(result) -> bool:
    return getattr(result, "rank", 0) == 0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def _render_history(history: list[dict], title: str) -> None:
    table = Table(title=title, title_justify="left")
    for col in ("epoch", "train loss", "train acc", "val acc", "lr", "img/s"):
        table.add_column(col, justify="right")
    for h in history:
        table.add_row(str(h["epoch"]), f"{h['train_loss']:.4f}", _pct(h.get("train_acc")), _pct(h.get("val_acc")),
                      f"{h['lr']:.2e}", f"{h['images_per_s']:.0f}")
    out.print(table)


def _mean_std(mean, std):
    return (tuple(mean) if mean else None), (tuple(std) if std else None)


@app.command()
def calibrate(model: ModelArg, data: DataOpt, output: OutOpt, teacher: TeacherOpt = None,
              val_data: ValDataOpt = None,
              batches: Annotated[int, typer.Option("--batches", help="calibration batches")] = 4,
              batch_size: BatchOpt = 32,
              select: Annotated[str, typer.Option("--select", help="all: fit every replaced unit | measured: keep "
                                                  "only the --budget least harmful ones (KL of logits)")] = "all",
              budget: Annotated[int | None, typer.Option("--budget", help="units to keep with --select "
                                                         "measured")] = None,
              input_size: SizeOpt = None, mean: MeanOpt = None, std: StdOpt = None, seed: SeedOpt = 0,
              trust_pickle: TrustOpt = False, as_json: JsonOpt = False) -> None:
    """Fit each replaced unit's scalars (a, b) to the original unit's outputs on a few batches."""
    from repconv import api

    r = api.calibrate(model, teacher=teacher, data=data, output=output, val_data=val_data, batches=batches,
                      batch_size=batch_size, select=select, budget=budget, input_size=input_size,
                      **dict(zip(("mean", "std"), _mean_std(mean, std), strict=True)), seed=seed,
                      trust_pickle=trust_pickle)
    if as_json:
        emit_json(r.to_dict())
        return
    if r.damage:
        dt = Table(title="Measured damage (each unit replaced alone)", title_justify="left")
        for col in ("unit", "KL to teacher", "kept"):
            dt.add_column(col)
        for d in sorted(r.damage, key=lambda d: d["kl"]):
            dt.add_row(d["unit"], f"{d['kl']:.4g}", "yes" if d["unit"] in r.selected else "no")
        out.print(dt)
    table = Table(title=f"Calibrated on {r.batches} batches ({r.images} images) -> {r.output}", title_justify="left")
    for col in ("unit", "a", "b"):
        table.add_column(col, justify="left" if col == "unit" else "right")
    for u in r.units:
        table.add_row(u["unit"], f"{u['a_before']:.4f} -> {u['a']:.4f}", f"{u['b_before']:.4f} -> {u['b']:.4f}")
    out.print(table)
    out.print(f"KL(teacher || model) on the calibration batches: {r.kl_before:.4g} -> {r.kl_after:.4g}")
    if r.val_acc is not None:
        out.print(f"val accuracy: {_pct(r.val_acc_before)} before, {_pct(r.val_acc)} after "
                  f"(teacher {_pct(r.teacher_val_acc)})")


@app.command()
def finetune(model: ModelArg, data: DataOpt, output: OutOpt, teacher: TeacherOpt = None,
             objective: Annotated[str, typer.Option("--objective", help="ce (labels) | distill (KL to the "
                                                    "teacher; unlabeled data works) | both")] = "ce",
             train: Annotated[str, typer.Option("--train", help="scalars | norm (scalars + norm affine + "
                                                "classifier) | all")] = "scalars",
             val_data: ValDataOpt = None, epochs: EpochsOpt = 3, batch_size: BatchOpt = 64,
             lr: Annotated[float, typer.Option("--lr")] = 1e-3,
             optimizer: Annotated[str, typer.Option("--optimizer", help="adamw | sgd")] = "adamw",
             weight_decay: Annotated[float, typer.Option("--weight-decay")] = 1e-4,
             warmup_epochs: WarmupOpt = 0.0, accum: AccumOpt = 1,
             temperature: Annotated[float, typer.Option("--temperature", help="distillation temperature")] = 2.0,
             alpha: Annotated[float, typer.Option("--alpha", help="label-loss weight in 'both'")] = 0.5,
             amp: AmpOpt = "auto", seed: SeedOpt = 0, workers: WorkersOpt = 0, batches_per_epoch: BatchesOpt = None,
             input_size: SizeOpt = None, mean: MeanOpt = None, std: StdOpt = None, resume: ResumeOpt = False,
             trust_pickle: TrustOpt = False, as_json: JsonOpt = False) -> None:
    """Recover a converted model with labels, distillation from the original, or both (torchrun-ready)."""
    from repconv import api

    m, s = _mean_std(mean, std)
    r = api.finetune(model, data=data, output=output, teacher=teacher, objective=objective, train=train,
                     val_data=val_data, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                     weight_decay=weight_decay, warmup_epochs=warmup_epochs, accum_steps=accum,
                     temperature=temperature, alpha=alpha, amp=amp, seed=seed, workers=workers,
                     batches_per_epoch=batches_per_epoch, input_size=input_size, mean=m, std=s, resume=resume,
                     progress=not as_json, trust_pickle=trust_pickle)
    if not _is_rank0(r):
        return
    if as_json:
        emit_json(r.to_dict())
        return
    _render_history(r.history, f"finetune --objective {r.objective} --train {r.train}: "
                    f"{human(r.trainable_params)} of {human(r.total_params)} parameters trained -> {r.output}")
    if r.resumed_from_epoch is not None:
        err.print(f"resumed after epoch {r.resumed_from_epoch}")


@app.command("train")
def train_(arch: Annotated[str, typer.Argument(help="architecture name (e.g. cifar_resnet56, resnet18)")],
           data: DataOpt, output: OutOpt,
           replace_every: Annotated[int, typer.Option("--replace-every", help="replace every K-th interior unit "
                                                      "of each run (K >= 2)")] = 2,
           no_replace: Annotated[bool, typer.Option("--no-replace", help="ordinary end-to-end training")] = False,
           val_data: ValDataOpt = None, epochs: EpochsOpt = 30, batch_size: BatchOpt = 64,
           lr: Annotated[float, typer.Option("--lr")] = 0.1,
           optimizer: Annotated[str, typer.Option("--optimizer", help="sgd | adamw")] = "sgd",
           weight_decay: Annotated[float, typer.Option("--weight-decay")] = 5e-4,
           warmup_epochs: WarmupOpt = 1.0, accum: AccumOpt = 1,
           label_smoothing: Annotated[float, typer.Option("--label-smoothing")] = 0.0,
           amp: AmpOpt = "auto", seed: SeedOpt = 0, workers: WorkersOpt = 0, batches_per_epoch: BatchesOpt = None,
           input_size: SizeOpt = None, mean: MeanOpt = None, std: StdOpt = None, resume: ResumeOpt = False,
           as_json: JsonOpt = False) -> None:
    """Train from scratch, with Replacement Learning (the papers' setting) or without."""
    from repconv import api

    m, s = _mean_std(mean, std)
    r = api.train(arch, data=data, output=output, replace=not no_replace, replace_every=replace_every,
                  val_data=val_data, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                  weight_decay=weight_decay, warmup_epochs=warmup_epochs, accum_steps=accum,
                  label_smoothing=label_smoothing, amp=amp, seed=seed, workers=workers,
                  batches_per_epoch=batches_per_epoch, input_size=input_size, mean=m, std=s, resume=resume,
                  progress=not as_json)
    if not _is_rank0(r):
        return
    if as_json:
        emit_json(r.to_dict())
        return
    units = f"{len(r.replaced_units)} replaced units" if r.replaced_units else "no replaced unit"
    _render_history(r.history, f"train {r.arch} ({units}; {human(r.trainable_params)} trainable of "
                    f"{human(r.params)}) -> {r.output}")


# ---------------------------------------------------------------- deploy (issue 4: fold, export, predict)


def _render_fusion(fusion) -> None:
    if fusion is None:
        return
    err.print(f"conv+BN fusion: {len(fusion.fused)} of {fusion.total} BatchNorms folded into a conv")
    reasons: dict[str, list[str]] = {}
    for item in fusion.unfused:
        reasons.setdefault(item["reason"], []).append(item["bn"])
    for reason, bns in reasons.items():
        shown = ", ".join(bns[:3]) + (f", ... ({len(bns)} in all)" if len(bns) > 3 else "")
        err.print(f"  left unfused ({len(bns)}): {reason}: {shown}", soft_wrap=True)


@app.command()
def fold(model: ModelArg,
         output: Annotated[Path, typer.Option("-o", "--output", help="output file: .safetensors (default) or .pt")],
         fuse_bn: Annotated[bool, typer.Option("--fuse-bn/--no-fuse-bn", help="also fuse conv + BatchNorm "
                                               "pairs (the file then needs repconv to load)")] = False,
         tolerance: Annotated[float, typer.Option("--tolerance", help="max relative difference converted vs "
                                                  "folded")] = 1e-5,
         arch: ArchOpt = None, num_classes: NumClassesOpt = None, trust_pickle: TrustOpt = False,
         as_json: JsonOpt = False) -> None:
    """Evaluate the replaced units' a*P_prev + b*P_next once into ordinary weights."""
    from repconv import api

    with err.status("folding"):
        result = api.fold(model, output=output, fuse_bn=fuse_bn, tolerance=tolerance, arch=arch,
                          num_classes=num_classes, trust_pickle=trust_pickle)
    if as_json:
        emit_json(result.to_dict())
        return
    table = Table(title=f"{result.meta.arch}: folded -> {output}", title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("folded units", str(len(result.folded_units)))
    table.add_row("max abs difference (converted vs folded)", f"{result.parity.max_abs:.3g}")
    table.add_row("max relative difference", f"{result.parity.max_rel:.3g}")
    table.add_row("loads into the original model class", "yes" if result.original_architecture else "no")
    out.print(table)
    _render_fusion(result.fusion)
    for note in result.warnings:
        err.print(f"[yellow]warning:[/] {note}", soft_wrap=True)


def _render_export(r) -> None:
    checks = Table(title="Verification (onnxruntime, optimization level " + r.ort_level + ")", title_justify="left")
    for col in ("stage", "against", "inputs", "batches", "max abs", "max rel", "top-1 agree", "required", "ok"):
        checks.add_column(col, justify="right" if col.startswith(("max", "top")) else "left")
    for c in r.checks:
        agree = "-" if c.top1_agreement is None else f"{c.top1_agreement:.1%}"
        checks.add_row(c.stage, c.reference, c.inputs, ",".join(map(str, c.batch_sizes)), f"{c.max_abs:.3g}",
                       f"{c.max_rel:.3g}", agree, c.tolerance, "yes" if c.passed else "NO")
    if r.checks:
        out.print(checks)
    ops = Table(title="ONNX ops (export -> written file)", title_justify="left")
    for col in ("op", "export", "written"):
        ops.add_column(col, justify="left" if col == "op" else "right")
    for op in sorted(set(r.ops_before) | set(r.ops_after)):
        ops.add_row(op, str(r.ops_before.get(op, 0)), str(r.ops_after.get(op, 0)))
    ops.add_row("total", str(sum(r.ops_before.values())), str(sum(r.ops_after.values())))
    out.print(ops)
    batch = "dynamic" if r.dynamic_batch else r.metadata.get("repconv.batch_size", "?")
    weights = f" (weights in {r.data_file.name})" if r.data_file else ""
    out.print(f"{r.path}: {human(r.file_size, 'B')}{weights}, {r.dtype}, opset {r.opset}, {r.exporter} exporter, "
              f"batch {batch}")
    _render_fusion(r.fusion)
    for note in r.warnings:
        err.print(f"[yellow]warning:[/] {note}", soft_wrap=True)

# ---- runtime helper: `export --format engine` (TensorRT) and `predict`

BackendOpt = Annotated[str | None, typer.Option("--backend", help="torch | ort | trt (default: what the file is)")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu | cuda (default: cuda when available)")]


def _engine_options(min_batch, opt_batch, max_batch, workspace, timing_cache, opt_level, verify):
    from repconv.api import EngineOptions

    return EngineOptions(min_batch, opt_batch, max_batch, workspace, timing_cache, opt_level, verify)


@app.command()
def export(model: ModelArg,
           output: Annotated[Path, typer.Option("-o", "--output", help="output file (.onnx)")],
           fmt: Annotated[str, typer.Option("--format", help="onnx | engine (TensorRT, built from an ONNX file)")]
           = "onnx",
           dtype: Annotated[str, typer.Option("--dtype", help="fp32 | fp16 | int8")] = "fp32",
           opset: Annotated[int | None, typer.Option("--opset", help="default: the newest both onnxruntime and "
                                                     "the exporter support")] = None,
           static: Annotated[bool, typer.Option("--static", help="fixed batch (--batch-size) instead of a "
                                                "dynamic one")] = False,
           batch_size: Annotated[int, typer.Option("--batch-size", help="the batch of a --static export")] = 1,
           exporter: Annotated[str, typer.Option("--exporter", help="dynamo (torch.export) | legacy "
                                                 "(TorchScript)")] = "dynamo",
           simplify: Annotated[bool, typer.Option("--simplify/--no-simplify", help="onnxslim graph "
                                                  "simplification")] = True,
           verify: Annotated[bool, typer.Option("--verify/--no-verify", help="compare onnxruntime with PyTorch "
                                                "(and fp16/int8 with fp32); fail above tolerance")] = True,
           fuse_bn: Annotated[bool, typer.Option("--fuse-bn/--no-fuse-bn", help="fuse conv + BN before "
                                                 "export")] = True,
           calib: Annotated[str | None, typer.Option("--calib", help="int8 calibration images: digits or an "
                                                     "image folder")] = None,
           calib_size: Annotated[int, typer.Option("--calib-size", help="calibration images to use")] = 256,
           check_images: Annotated[str | None, typer.Option("--check-images", help="real images the fp16/int8 "
                                                            "graph is checked on (default: --calib)")] = None,
           min_agreement: Annotated[float | None, typer.Option("--min-agreement", help="required top-1 "
                                                               "agreement with fp32 (fp16 0.99, int8 0.98)")] = None,
           ort_level: Annotated[str, typer.Option("--ort-level", help="onnxruntime optimization level used "
                                                  "for checks: disable | basic | extended | all")] = "all",
           external_data: Annotated[bool, typer.Option("--external-data", help="weights in FILE.onnx.data beside "
                                                       "the graph (always when the graph is over 2 GiB)")] = False,
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
           arch: ArchOpt = None, num_classes: NumClassesOpt = None, trust_pickle: TrustOpt = False,
           as_json: JsonOpt = False) -> None:
    """Export a folded (or converted: folded first) model as a verified ONNX file, or a TensorRT engine."""
    from repconv import api

    if fmt not in ("onnx", "engine"):
        raise typer.BadParameter(f"--format must be onnx or engine, not {fmt!r}")
    if fmt == "engine":
        options = _engine_options(min_batch, opt_batch, max_batch, workspace, timing_cache, opt_level, verify)
        onnx_options = dict(opset=opset, dynamic_batch=not static, batch_size=batch_size, exporter=exporter,
                            simplify=simplify, verify=verify, calib=calib,
                            calib_size=calib_size, check_images=check_images, fuse_bn=fuse_bn, ort_level=ort_level,
                            min_agreement=min_agreement, external_data=external_data or None)  # ONNX first
        _export_engine(model, output, options, print_trtexec, dtype=dtype, arch=arch, num_classes=num_classes,
                       trust_pickle=trust_pickle, as_json=as_json, onnx_options=onnx_options)
        return
    with err.status("exporting") as status:
        result = api.export(model, output, arch=arch, num_classes=num_classes,
                            trust_pickle=trust_pickle, dtype=dtype, opset=opset, dynamic_batch=not static,
                            batch_size=batch_size, exporter=exporter, simplify=simplify, verify=verify,
                            calib=calib, calib_size=calib_size, check_images=check_images, fuse_bn=fuse_bn,
                            ort_level=ort_level, min_agreement=min_agreement, external_data=external_data or None,
                            progress=status.update)
    if as_json:
        emit_json(result.to_dict())
    else:
        _render_export(result)


def _export_engine(model: Path, output: Path, options, print_trtexec: bool, *, dtype: str, arch: str | None,
                   num_classes: int | None, trust_pickle: bool, as_json: bool, onnx_options: dict) -> None:
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
    with err.status("building the TensorRT engine"):
        build = api.build_engine(model, output, options, dtype=dtype, arch=arch, num_classes=num_classes,
                                 trust_pickle=trust_pickle, **onnx_options)
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
          channels_last: Annotated[bool, typer.Option("--channels-last", help="run PyTorch checkpoints in "
                                                      "channels_last memory format (faster max-pool on CPU)")] = False,
          arch: ArchOpt = None, num_classes: NumClassesOpt = None, trust_pickle: TrustOpt = False,
          json_out: Annotated[Path | None, typer.Option("--json-out", help="also write the full JSON report "
                                                        "to this file")] = None,
          plot: Annotated[Path | None, typer.Option("--plot", help="write a latency/throughput plot "
                                                    "(.png, .svg or .pdf)")] = None,
          as_json: JsonOpt = False) -> None:
    """Latency, throughput, size and memory of artifacts side by side, in one process, on the same inputs."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from repconv import api
    from repconv.runtime.bench import parse_batches

    batches = parse_batches(batch)
    backends = [b.strip() for b in backend.split(",") if b.strip()] if backend else None
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                   transient=True)
    task = bar.add_task("bench")

    def progress(message: str) -> None:
        bar.start()  # only once measuring begins, so that an early one-line error stays one line
        bar.update(task, description=message)

    try:
        report = api.bench(artifacts, batches=batches, size=size, backends=backends, device=device, warmup=warmup,
                           repeats=repeats, max_seconds=max_seconds, threads=threads, channels_last=channels_last,
                           arch=arch, num_classes=num_classes, trust_pickle=trust_pickle, json_out=json_out,
                           plot=plot, progress=progress)
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
    layout = ", torch in channels_last" if report.options.get("channels_last") else ""
    latency = Table(title=f"Latency at {report.options['size']}px{layout}, {report.machine['torch_threads']} threads "
                    f"({report.machine['cpu']}, load {report.machine['load_average'][0]:.1f})"
                    if report.machine.get("load_average") else f"Latency{layout}", title_justify="left")
    for col in ("artifact", "backend", "batch", "median ms", "p90 ms", "images/s", "speed-up"):
        latency.add_column(col, justify="left" if col in ("artifact", "backend") else "right")
    for r in report.targets:
        for t in r.timings:
            latency.add_row(r.label, r.backend, str(t.batch), f"{t.median_ms:.2f}", f"{t.p90_ms:.2f}",
                            f"{t.throughput:.1f}", f"{t.speedup:.2f}x" if t.speedup else "-")
        for b, why in r.skipped.items():
            latency.add_row(r.label, r.backend, b, "-", "-", "-", f"skipped: {why}")
    out.print(latency)



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
    from rich import box

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    # with latency (the demo), MACs stay in the report so that the table fits 80 columns
    counts = ("params", "trainable_params") + (("macs",) if latency is None else ())
    cols = ["stage", "val acc", "params", "trainable", *(["MACs"] if latency is None else []), "file",
            *(["ms b1"] if latency is not None else [])]
    for col in cols:
        table.add_column(col, justify="left" if col == "stage" else "right", no_wrap=True)
    for s in stages:
        row = [s["name"], "-" if s["val_acc"] is None else f"{100 * s['val_acc']:.2f}%",
               *("-" if s[k] is None else human(s[k]) for k in counts),
               "-" if s["file_size"] is None else human(s["file_size"], "B")]
        if latency is not None:
            ms = latency.get(s["name"])
            row.append("-" if ms is None else f"{ms:.2f}")
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
    out.print(f"artifacts, run.json and report in {result.out}; open {result.report}", soft_wrap=True)


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
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors: unknown option, bad value (typer's vendored click)
        if hasattr(exc, "show"):
            exc.show()
        else:
            err.print(f"[red]error:[/] {escape(exc.format_message())}", soft_wrap=True)
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
