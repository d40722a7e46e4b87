"""Rich tables of the commands that run and measure artifacts (predict, validate, bench, search, report)."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.markup import escape
from rich.table import Table

from repconv.cli.render import note, out, table
from repconv.formatting import human, pct, race_summary

# ---------------------------------------------------------------- run


def predictions(result, artifact: Path) -> None:
    k = max((len(p.top) for p in result.predictions), default=0)
    t = Table(title=escape(f"{artifact.name} [{result.backend}, {result.device}]"), title_justify="left")
    t.add_column("image", overflow="fold")
    for rank in range(1, k + 1):
        t.add_column(f"#{rank}")
    for p in result.predictions:
        t.add_row(p.path, *[f"{s.label if s.label is not None else s.index} ({s.probability:.3f})" for s in p.top])
    out.print(t)


def validation(result, per_class: bool = False) -> None:
    t = table(f"{result.samples} images of {result.data} ({result.split}), {len(result.classes)} classes",
              ["#", "artifact", "backend", "top-1", "top-5", "seconds"], right=("top-1", "top-5", "seconds"))
    for i, s in enumerate(result.scores):
        t.add_row(str(i), s.artifact, f"{s.backend} ({s.device})", pct(s.top1), pct(s.top5), f"{s.seconds:.2f}")
    out.print(t)
    if len(result.scores) > 1:
        agree = table("Top-1 agreement", ["", *(f"#{i}" for i in range(len(result.scores)))],
                      right=tuple(f"#{i}" for i in range(len(result.scores))))
        for i, row in enumerate(result.agreement):
            agree.add_row(f"#{i}", *(pct(v) for v in row))
        out.print(agree)
    if per_class:
        classes = table("Accuracy per class", ["class", "images", *(f"#{i}" for i in range(len(result.scores)))],
                        right=("images", *(f"#{i}" for i in range(len(result.scores)))))
        for name in result.classes:
            classes.add_row(name, str(result.class_counts.get(name, "")),
                            *(pct(s.per_class.get(name)) for s in result.scores))
        out.print(classes)


def bench(report) -> None:
    base = report.targets[0]
    numeric = ("params", "MACs / image", "file", "peak memory", "load", "max |Δ| vs baseline", "top-1 agree")
    models = table(f"Artifacts (baseline: {report.baseline})", ["artifact", "backend", "dtype", *numeric],
                   right=numeric)
    for r in report.targets:
        models.add_row(r.label, f"{r.backend} ({r.device})", r.dtype, human(r.params), human(r.macs),
                       human(r.file_bytes, "B"), human(r.peak_memory_bytes, "B"), f"{r.load_seconds:.2f}s",
                       "baseline" if r is base else (f"{r.max_abs_diff_vs_baseline:.2e}"
                                                     if r.max_abs_diff_vs_baseline is not None else "-"),
                       "" if r is base else (f"{r.top1_agreement_vs_baseline:.0%}"
                                             if r.top1_agreement_vs_baseline is not None else "-"))
    out.print(models)
    layout = ", torch in channels_last" if report.options.get("channels_last") else ""
    m = report.machine
    title = (f"Latency at {report.options['size']}px{layout}, {m['torch_threads']} threads ({m['cpu']}, load "
             f"{m['load_average'][0]:.1f})" if m.get("load_average") else f"Latency{layout}")
    timing = ("batch", "median ms", "p90 ms", "images/s", "speed-up")
    latency = table(title, ["artifact", "backend", *timing], right=timing)
    for r in report.targets:
        for t in r.timings:
            latency.add_row(r.label, r.backend, str(t.batch), f"{t.median_ms:.2f}", f"{t.p90_ms:.2f}",
                            f"{t.throughput:.1f}", f"{t.speedup:.2f}x" if t.speedup else "-")
        for b, why in r.skipped.items():
            latency.add_row(r.label, r.backend, b, "-", "-", "-", f"skipped: {why}")
    out.print(latency)


# ---------------------------------------------------------------- search


def searched(r) -> None:
    sel = r.selection
    plan = table(f"Plan: {len(sel.choice)} units converted", ["unit", "candidate"])
    for unit, choice in sel.choice.items():
        plan.add_row(unit, choice)
    out.print(plan)
    t = table("Predicted and measured", ["", "predicted", "measured"], right=("predicted", "measured"))
    t.add_row("latency vs the original", f"{r.predicted_ratio:.3f}", f"{r.latency_ratio:.3f}")
    t.add_row("latency, ms", f"{r.predicted_latency_ms:.2f}", f"{r.measured_latency_ms:.2f}")
    t.add_row("drop, points of agreement", f"{r.predicted_drop:.1f}",
              "-" if r.agreement is None else f"{100 * (1 - r.agreement):.1f}")
    t.add_row("accuracy (original -> searched)", "", f"{pct(r.val_acc_original)} -> {pct(r.val_acc)}")
    out.print(t)
    if len(r.latency_probes) > 1:
        probes = table("Latency budget checked on the assembled plans", ["plan", "units", "table", "predicted",
                       "measured"], right=("units", "table", "predicted", "measured"))
        for i, p in enumerate(r.latency_probes, 1):
            probes.add_row(str(i), str(len(p["choice"])), f"{p['table_ratio']:.3f}", f"{p['predicted_ratio']:.3f}",
                           f"{p['measured_ratio']:.3f}")
        out.print(probes)
    if r.contenders:
        raced = table(f"Plans raced (the table's plan, uniform policies and timed plans within the budget): "
                      f"{r.kept} kept", ["plan", "units", "predicted drop", "measured latency"],
                      right=("units", "predicted drop", "measured latency"))
        for c in r.contenders:
            ratio = c.get("measured_ratio")
            raced.add_row(c["name"], str(len(c["choice"])), f"{c['predicted_drop']:.1f}",
                          "-" if ratio is None else f"{ratio:.3f}")
        out.print(raced)
    if r.start:
        note(f"starts raced: the global stage went on from the {r.start['chosen']} model ({race_summary(r.start)})")
    if r.local_skipped:
        note("local (block-wise) distillation skipped: 0 local epochs")
    note(f"checkpoint: {r.checkpoint or '- (nothing converted)'}")
    note(f"candidate table: {r.table_path} ({'reused' if r.table_reused else 'built'}); plot: {r.plot}")


# ---------------------------------------------------------------- report / demo


def stages(rows: list[dict], latency: dict[str, float] | None, title: str) -> None:
    counts = ("params", "trainable_params") + (("macs",) if latency is None else ())
    cols = ["stage", "val acc", "params", "trainable", *(["MACs"] if latency is None else []), "file",
            *(["ms b1"] if latency is not None else [])]
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for col in cols:
        t.add_column(col, justify="left" if col == "stage" else "right", no_wrap=True)
    for s in rows:
        row = [s["name"], pct(s["val_acc"]), *(human(s[k]) for k in counts), human(s["file_size"], "B")]
        if latency is not None:
            ms = latency.get(s["name"])
            row.append("-" if ms is None else f"{ms:.2f}")
        t.add_row(*row)
    out.print(t)
