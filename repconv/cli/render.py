"""Rendering results: rich tables on stdout, notes on stderr, or one JSON object with ``--json``.

Numbers are formatted by :mod:`repconv.formatting`, the same functions the HTML report uses.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from repconv.formatting import human, pct, ratio

# Piped output is not cut to 80 columns: a table read from a file shows every figure whole.
out = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False)


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


def note(text: str) -> None:
    err.print(text, markup=False, highlight=False, soft_wrap=True)


def warn(text: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(text)}", soft_wrap=True)


class _Lines:
    """What a spinner shows, as plain timestamped lines: for logs and pipes, where a spinner shows nothing.

    A step is printed when at least ``every`` seconds passed since the last line (or the start): a quick
    command, or an error in its first seconds, stays quiet; a long one says where it is.
    """

    every = 5.0

    def __init__(self, message: str):
        self.start = self.last = time.monotonic()

    def update(self, message: str) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            note(f"[{now - self.start:6.1f}s] {message}")


@contextlib.contextmanager
def status(message: str) -> Iterator[Any]:
    """A spinner in a terminal, plain progress lines otherwise; ``.update(text)`` reports a step."""
    if err.is_terminal:
        with err.status(message) as spinner:
            yield spinner
    else:
        yield _Lines(message)


def table(title: str, columns: list[str], right: tuple[str, ...] = (), **kw) -> Table:
    t = Table(title=escape(title), title_justify="left", **kw)
    for col in columns:
        t.add_column(col, justify="right" if col in right else "left")
    return t


# ---------------------------------------------------------------- convert / inspect


def summary(s, title: str) -> None:
    if s.runs:
        runs = table("Repeated units (runs)", ["container", "members", "interior (replaceable)", "params / unit",
                                               "activation"])
        for r in s.runs:
            members = r["members"]
            runs.add_row(r["container"], f"{len(members)}: " + ", ".join(m.rsplit(".", 1)[-1] for m in members),
                         ", ".join(m.rsplit(".", 1)[-1] for m in r["interior"]) or "-",
                         human(r["params_per_member"]),
                         "x".join(map(str, r["output_shape"][1:])) if r.get("output_shape") else "-")
        out.print(runs)
    if s.steps:
        steps = table("Plan", ["step", "module", "from / op", "init", "a", "b", "weight-space fit error"])
        for st in s.steps:
            if st["kind"] == "replace":
                fit = "-" if st.get("fit_error") is None else f"{st['fit_error']:.1%}"
                steps.add_row("replace", st["unit"], f"{st['prev']} + {st['next']}", st["init"],
                              f"{st['a']:.4f}", f"{st['b']:.4f}", fit)
            else:
                steps.add_row("parameter-free", st["target"], f"{st['form']}:{st['op']}{st['kernel']}"
                              f"/s{st['stride']}", "-", "-", "-", "-")
        out.print(steps)
    t = table(title, ["", "before", "after", "ratio"], right=("before", "after", "ratio"))
    t.add_row("parameters", human(s.params_before), human(s.params_after), ratio(s.params_before, s.params_after))
    t.add_row("trainable parameters", human(s.params_before), human(s.trainable_params),
              ratio(s.params_before, s.trainable_params))
    t.add_row(f"MACs @ {s.input_size[1]}x{s.input_size[2]}", human(s.macs_before), human(s.macs_after),
              ratio(s.macs_before, s.macs_after))
    t.add_row("replaced units", "", str(len(s.replaced_units)), "")
    out.print(t)
    _parameter_free(s)
    if s.opaque_modules:
        note(f"opaque (not rewritten): {', '.join(s.opaque_modules)}")
    if s.message:
        err.print(f"[yellow]nothing to convert:[/] {escape(s.message)}", soft_wrap=True)


def _parameter_free(s) -> None:
    if not s.parameter_free_targets:
        return
    targets = table("Parameter-free targets", ["target", "kind", "k/s", "params", "absorbs", "all", "hybrid"])
    for t in s.parameter_free_targets:
        absorbs = ", ".join(a.rsplit(".", 1)[-1] for a in t["absorbed"]) or "-"
        targets.add_row(t["target"], t["kind"], f"{t['kernel']}/{t['stride']}", human(t["params"]), absorbs,
                        t["all"], t["hybrid"])
    out.print(targets)
    macs = f"MACs @ {s.input_size[1]}x{s.input_size[2]}"
    policies = table("What each parameter-free policy would leave",
                     ["policy", "steps", "parameters", "ratio", macs, "ratio "],
                     right=("steps", "parameters", "ratio", macs, "ratio "))
    for p in s.parameter_free_policies:
        policies.add_row(p["policy"], str(p["steps"]), human(p["params_after"]),
                         ratio(s.params_before, p["params_after"]), human(p["macs_after"]),
                         ratio(s.macs_before, p["macs_after"]))
    out.print(policies)


def candidates(t) -> None:
    """A candidate table `repconv search` measured: what each conversion of each unit costs and saves."""
    cols = ("latency Δ ms", "damage (points)", "KL", "params removed")
    rows = table(f"Candidate table ({t.target}, original {t.base_latency_ms:.2f} ms)", ["unit", "candidate", *cols],
                 right=cols)
    for r in t.rows():
        rows.add_row(r["unit"], r["candidate"], f"{r['latency_delta_ms']:+.3f}", f"{r['damage']:.2f}",
                     f"{r['kl']:.4f}", human(r["params_removed"]))
    out.print(rows)


# ---------------------------------------------------------------- recover


def calibration(r) -> None:
    if r.damage:
        dt = table("Measured damage (each unit replaced alone)", ["unit", "KL to teacher", "kept"])
        for d in sorted(r.damage, key=lambda d: d["kl"]):
            dt.add_row(d["unit"], f"{d['kl']:.4g}", "yes" if d["unit"] in r.selected else "no")
        out.print(dt)
    if r.refit:
        rt = table(f"Least-squares refit on {r.batches} batches ({r.images} images): relative error of each layer",
                   ["after the step", "layer fitted", "kind", "error"], right=("error",))
        for site in r.refit["sites"]:
            rt.add_row(site["step"], site["module"], site["kind"],
                       f"{site['error_before']:.3f} -> {site['error_after']:.3f}")
        out.print(rt)
        for step in r.refit["skipped"]:
            warn(f"'{step}': no linear layer reads it directly, so it was not refitted")
    if r.units:
        t = table(f"Calibrated on {r.batches} batches ({r.images} images) -> {r.output}", ["unit", "a", "b"],
                  right=("a", "b"))
        for u in r.units:
            t.add_row(u["unit"], f"{u['a_before']:.4f} -> {u['a']:.4f}", f"{u['b_before']:.4f} -> {u['b']:.4f}")
        out.print(t)
    out.print(f"KL(teacher || model) on the calibration batches: {r.kl_before:.4g} -> {r.kl_after:.4g}"
              + (" (no better: the model was left as it came)" if r.kept_input else ""))
    held = (f", held-out ({r.heldout_images} images) {pct(r.heldout_agreement_before)} -> "
            f"{pct(r.heldout_agreement_after)}") if r.heldout_images else ""
    out.print(f"agreement with the teacher: calibration {pct(r.agreement_before)} -> {pct(r.agreement_after)}{held} "
              f"(BatchNorm statistics: {r.bn_stats})")
    if r.val_acc is not None:
        out.print(f"val accuracy: {pct(r.val_acc_before)} before, {pct(r.val_acc)} after "
                  f"(teacher {pct(r.teacher_val_acc)})")


def history(rows: list[dict], title: str) -> None:
    cols = ("epoch", "train loss", "train acc", "val acc", "agreement", "lr", "img/s")
    t = table(title, list(cols), right=cols)
    for h in rows:
        t.add_row(str(h["epoch"]), f"{h['train_loss']:.4f}", pct(h.get("train_acc")), pct(h.get("val_acc")),
                  pct(h.get("agreement")), f"{h['lr']:.2e}", f"{h['images_per_s']:.0f}")
    out.print(t)


def written(r) -> None:
    """Which weights a recovery wrote, and why (stderr)."""
    metric = f" by {r.select_metric}" if r.select_metric else ""
    source = f" on {r.val_source} images" if r.val_source else ""
    before = ""
    if r.input_metrics and r.select_metric and r.input_metrics.get(r.select_metric) is not None:
        before = f" (input {pct(r.input_metrics[r.select_metric])})"
    note(f"written: {r.written}{metric}{source}{before}; BatchNorm statistics: {r.bn_stats}, keep: {r.keep}")


# ---------------------------------------------------------------- deploy


def fusion(f) -> None:
    if f is None:
        return
    note(f"conv+BN fusion: {len(f.fused)} of {f.total} BatchNorms folded into a conv")
    reasons: dict[str, list[str]] = {}
    for item in f.unfused:
        reasons.setdefault(item["reason"], []).append(item["bn"])
    for reason, bns in reasons.items():
        shown = ", ".join(bns[:3]) + (f", ... ({len(bns)} in all)" if len(bns) > 3 else "")
        note(f"  left unfused ({len(bns)}): {reason}: {shown}")


def folded(result, output: Path) -> None:
    t = table(f"{result.meta.arch}: folded -> {output}", ["", "value"], right=("value",))
    t.add_row("folded units", str(len(result.folded_units)))
    t.add_row("max abs difference (converted vs folded)", f"{result.parity.max_abs:.3g}")
    t.add_row("max relative difference", f"{result.parity.max_rel:.3g}")
    t.add_row("loads into the original model class", "yes" if result.original_architecture else "no")
    out.print(t)
    fusion(result.fusion)
    for w in result.warnings:
        warn(w)


def exported(r) -> None:
    if r.checks:
        checks = table(f"Verification (onnxruntime, optimization level {r.ort_level})",
                       ["stage", "against", "inputs", "batches", "max abs", "max rel", "top-1 agree", "required", "ok"],
                       right=("max abs", "max rel", "top-1 agree"))
        for c in r.checks:
            agree = "-" if c.top1_agreement is None else f"{c.top1_agreement:.1%}"
            checks.add_row(c.stage, c.reference, c.inputs, ",".join(map(str, c.batch_sizes)), f"{c.max_abs:.3g}",
                           f"{c.max_rel:.3g}", agree, c.tolerance, "yes" if c.passed else "NO")
        out.print(checks)
    ops = table("ONNX ops (export -> written file)", ["op", "export", "written"], right=("export", "written"))
    for op in sorted(set(r.ops_before) | set(r.ops_after)):
        ops.add_row(op, str(r.ops_before.get(op, 0)), str(r.ops_after.get(op, 0)))
    ops.add_row("total", str(sum(r.ops_before.values())), str(sum(r.ops_after.values())))
    out.print(ops)
    batch = "dynamic" if r.dynamic_batch else r.metadata.get("repconv.batch_size", "?")
    weights = f" (weights in {r.data_file.name})" if r.data_file else ""
    out.print(f"{r.path}: {human(r.file_size, 'B')}{weights}, {r.dtype}, opset {r.opset}, {r.exporter} exporter, "
              f"batch {batch}")
    fusion(r.fusion)
    for w in r.warnings:
        warn(w)


def engine(build) -> None:
    t = table(f"TensorRT engine -> {build.engine}", ["", "value"])
    t.add_row("precision (from the ONNX)", build.dtype)
    for name, s in build.shapes.items():
        t.add_row(f"profile '{name}' min/opt/max", " / ".join("x".join(map(str, s[k])) for k in ("min", "opt", "max")))
    v = build.versions
    t.add_row("TensorRT / CUDA / GPU", f"{v['tensorrt']} / {v['cuda']} / {v['gpu']} (sm {v['compute_capability']})")
    t.add_row("engine size", human(build.size_bytes, "B"))
    for key, fig in build.verification.items():
        t.add_row(f"vs ONNX Runtime, {key.replace('_', ' ')}", f"max abs {fig['max_abs']:.2e} "
                  f"({fig['max_rel']:.2%}), top-1 agreement {fig['top1_agreement']:.0%}")
    out.print(t)
