"""The run directory (``RUN_DIR/run.json``) and its self-contained HTML report.

A run directory holds the artifacts of one walk through the pipeline and ``run.json``, which records
every stage's figures, the plan, the machine and the bench results (format in docs/report.md).
:func:`write_report` turns it into one HTML page that needs no network: inline CSS, plots as inline
base64 PNGs drawn with matplotlib.

A folder ``repconv search -o`` wrote (``search.json`` and ``pareto.png``, see repconv.search.run) gets a
search section: the result's predicted and measured figures, its Pareto rows and the plot inlined. Such a
folder needs no ``run.json``: the report then shows the search alone.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from repconv._version import __version__
from repconv.errors import InputFileError
from repconv.formatting import human, human_bytes, pct, race_summary
from repconv.io import write_text_atomic

__all__ = ["ParityRecord", "PlanRow", "ReportResult", "RunRecord", "SearchRecord", "Stage", "report",
           "write_report"]

RUN_FILE = "run.json"
RUN_FORMAT = "repconv-run"
RUN_VERSION = 1
# what `repconv search` writes into its output folder (repconv.search.run.RESULT_FILE / PLOT_FILE: the search
# layer sits above this one, so the names are repeated here and a test keeps them equal)
SEARCH_FILE, SEARCH_PLOT = "search.json", "pareto.png"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- the run record


@dataclass
class ParityRecord:
    """How far one stage's outputs are from its reference's (the stage it was made from)."""

    reference: str  # name of the reference stage
    max_abs: float
    max_rel: float
    top1_agreement: float | None = None  # share of images whose top-1 class matches the reference's
    inputs: str = ""  # what the check ran on


@dataclass
class Stage:
    """One artifact of the run and what was measured on it."""

    name: str  # e.g. original, replacement, replacement-calibrated, replacement-folded, replacement-onnx-int8
    kind: str  # model | converted | calibrated | finetuned | folded | onnx
    method: str | None = None  # replacement | parameter-free | None (the original)
    artifact: str | None = None  # path relative to the run directory
    file_size: int | None = None  # bytes
    val_acc: float | None = None  # top-1 accuracy on the data's validation split
    params: int | None = None
    trainable_params: int | None = None  # parameters the stage that made it trained (fine-tuning)
    macs: int | None = None  # multiply-accumulates for one image
    parity: list[ParityRecord] = field(default_factory=list)
    seconds: float | None = None  # wall time of the stage that made it
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> Stage:
        data = _known(cls, data)
        data["parity"] = [ParityRecord(**_known(ParityRecord, p)) for p in data.get("parity", [])]
        return cls(**data)


@dataclass
class PlanRow:
    """One change a conversion made: a replaced unit, or a parameter-free target."""

    method: str  # replacement | parameter-free
    unit: str
    neighbours: list[str] = field(default_factory=list)  # replacement: [prev, next]
    scalars: dict[str, float] = field(default_factory=dict)  # replacement: fitted a, b
    detail: str = ""  # parameter-free: the operation that replaced it


@dataclass
class RunRecord:
    """Everything ``run.json`` holds."""

    title: str = "repconv run"
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    data: dict[str, Any] = field(default_factory=dict)  # name, split, images, input_size
    stages: list[Stage] = field(default_factory=list)
    plan: list[PlanRow] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    bench: dict[str, Any] | None = None  # the JSON `repconv bench --json` writes
    notes: list[str] = field(default_factory=list)
    seconds: float | None = None  # wall time of the whole run
    format: str = RUN_FORMAT
    version: int = RUN_VERSION

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def add(self, stage: Stage) -> Stage:
        self.stages = [s for s in self.stages if s.name != stage.name] + [stage]
        return stage

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunRecord:
        data = _known(cls, data)
        data["stages"] = [Stage.from_dict(s) for s in data.get("stages", [])]
        data["plan"] = [PlanRow(**_known(PlanRow, r)) for r in data.get("plan", [])]
        return cls(**data)

    def save(self, run_dir: str | os.PathLike) -> Path:
        return write_text_atomic(Path(run_dir) / RUN_FILE, json.dumps(self.to_dict(), indent=2) + "\n")


def _known(cls: type, data: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def read_run(run_dir: str | os.PathLike) -> RunRecord:
    """Read ``RUN_DIR/run.json`` (or a run.json path) with one-line errors for every way it can be wrong."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / RUN_FILE
    if not path.exists():
        raise InputFileError(f"'{path}' does not exist",
                             "give a folder written by `repconv demo --out DIR` (run.json) or `repconv search -o DIR` "
                             "(search.json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(f"'{path}' is not valid JSON ({exc})", "re-run the pipeline that wrote it") from exc
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
        raise InputFileError(f"'{path}' is not a repconv run record (no \"format\": \"{RUN_FORMAT}\")",
                             "give the run.json `repconv demo` writes; see docs/report.md for the format")
    if data.get("version", RUN_VERSION) > RUN_VERSION:
        raise InputFileError(f"'{path}' has run format version {data['version']}, newer than this repconv reads",
                             "upgrade repconv")
    try:
        return RunRecord.from_dict(data)
    except (TypeError, AttributeError) as exc:
        raise InputFileError(f"'{path}' does not follow the run format ({exc})", "see docs/report.md") from exc


# ---------------------------------------------------------------- a search result


@dataclass
class SearchRecord:
    """A search result in the run folder: ``search.json`` (the SearchResult's dict) and ``pareto.png``."""

    result: dict[str, Any]
    plot: str | None = None  # pareto.png as base64, None when the folder has no PNG of that name

    @property
    def rows(self) -> list[dict]:
        """The Pareto rows (``pareto.pareto_table``: name, kind, latency_ms, accuracy, speedup, pareto, ...)."""
        return [r for r in self.result.get("pareto") or [] if isinstance(r, dict)]


def read_search(run_dir: str | os.PathLike) -> SearchRecord | None:
    """``RUN_DIR/search.json`` and ``RUN_DIR/pareto.png`` (base64), or None when the folder holds no search."""
    folder = Path(run_dir)
    path = folder / SEARCH_FILE
    if not folder.is_dir() or not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(f"'{path}' is not valid JSON ({exc})", "re-run `repconv search`") from exc
    if not isinstance(result, dict):
        raise InputFileError(f"'{path}' is not a search result (not a JSON object)", "re-run `repconv search`")
    png = folder / SEARCH_PLOT
    data = png.read_bytes() if png.is_file() else b""
    return SearchRecord(result, base64.b64encode(data).decode("ascii") if data.startswith(PNG_SIGNATURE) else None)


def read_folder(run_dir: str | os.PathLike) -> tuple[RunRecord, SearchRecord | None]:
    """The run record and search result of a folder. A search folder without ``run.json`` gets an empty record
    (titled after the folder, dated by its search.json); without either file, :func:`read_run`'s error."""
    search = read_search(run_dir)
    if search is not None and not (Path(run_dir) / RUN_FILE).exists():
        written = (Path(run_dir) / SEARCH_FILE).stat().st_mtime
        created = _dt.datetime.fromtimestamp(written, _dt.timezone.utc).isoformat(timespec="seconds")
        return RunRecord(title=f"repconv search: {Path(run_dir).resolve().name}", created=created), search
    return read_run(run_dir), search


# ---------------------------------------------------------------- bench results


@dataclass
class BenchRow:
    """One measurement from the bench JSON, as the report shows it."""

    artifact: str
    backend: str
    batch: int
    median_ms: float
    p90_ms: float | None
    throughput: float | None


def bench_rows(bench: dict | None) -> list[BenchRow]:
    """The measurements of a `repconv bench --json` object: every timing of every target."""
    rows = []
    for target in (bench or {}).get("targets", []):
        label = str(target.get("label") or Path(str(target.get("path", "?"))).name)
        for t in target.get("timings", []):
            rows.append(BenchRow(label, str(target.get("backend", "")), int(t["batch"]), float(t["median_ms"]),
                                 _opt_float(t.get("p90_ms")), _opt_float(t.get("throughput"))))
    return rows


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


# ---------------------------------------------------------------- summary (what --json prints)


def summarize_run(run: RunRecord, search: SearchRecord | None = None) -> dict[str, Any]:
    """The headline figures: accuracy per stage and the reductions against the first stage (and the search's
    row count, when the folder holds one)."""
    base = run.stages[0] if run.stages else None
    stages = []
    for s in run.stages:
        row = {"name": s.name, "kind": s.kind, "method": s.method, "val_acc": s.val_acc, "params": s.params,
               "trainable_params": s.trainable_params, "macs": s.macs, "file_size": s.file_size,
               "params_ratio": _ratio(base.params if base else None, s.params),
               "macs_ratio": _ratio(base.macs if base else None, s.macs),
               "parity": [asdict(p) for p in s.parity]}
        stages.append(row)
    return {"title": run.title, "created": run.created, "baseline": base.name if base else None,
            "stages": stages, "plan_rows": len(run.plan), "bench_rows": len(bench_rows(run.bench)),
            "search_rows": len(search.rows) if search is not None else 0}


def _ratio(before: float | None, after: float | None) -> float | None:
    return after / before if before and after is not None else None


# ---------------------------------------------------------------- plots


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(stages: Sequence[Stage]) -> str | None:
    shown = [s for s in stages if s.val_acc is not None]
    if not shown:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(shown) + 1.2))
    names = [s.name for s in shown][::-1]
    accs = [100 * s.val_acc for s in shown][::-1]
    bars = ax.barh(names, accs, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{a:.1f}%" for a in accs], padding=3, fontsize=8)
    ax.set_xlim(0, 110)
    ax.set_xlabel("top-1 accuracy on the validation split (%)")
    ax.set_title("Accuracy of each stage")
    return _png(fig)


def plot_size(stages: Sequence[Stage]) -> str | None:
    shown = [s for s in stages if s.params is not None and s.kind != "onnx"]
    if not shown:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 0.45 * len(shown) + 1.4), sharey=True)
    names = [s.name for s in shown][::-1]
    series = (("parameters", [s.params for s in shown][::-1], [s.trainable_params for s in shown][::-1]),
              ("MACs per image", [s.macs or 0 for s in shown][::-1], None))
    for ax, (label, values, trainable) in zip(axes, series, strict=True):
        ax.barh(names, values, color="#55a868", label=label)
        if trainable is not None and any(t is not None for t in trainable):
            ax.barh(names, [t or 0 for t in trainable], color="#c44e52", height=0.4,
                    label="trainable during fine-tuning")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xlabel(label)
    fig.suptitle("Parameters and MACs")
    return _png(fig)


def plot_latency(rows: Sequence[BenchRow]) -> str | None:
    if not rows:
        return None
    plt = _pyplot()
    batches = sorted({r.batch for r in rows})
    labels = list(dict.fromkeys(f"{r.artifact} ({r.backend})" for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches) + 2, 0.45 * len(labels) + 1.6),
                             squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        by_label = {f"{r.artifact} ({r.backend})": r for r in rows if r.batch == batch}
        names = [n for n in labels if n in by_label][::-1]
        med = [by_label[n].median_ms for n in names]
        p90 = [by_label[n].p90_ms if by_label[n].p90_ms is not None else by_label[n].median_ms for n in names]
        err = [[0] * len(med), [max(p - m, 0.0) for m, p in zip(med, p90, strict=True)]]
        ax.barh(names, med, xerr=err, color="#8172b2", capsize=3)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("latency, ms (bar: median, whisker: p90)")
        if ax is not axes[0][0]:
            ax.set_yticklabels([])
    fig.suptitle("Latency from repconv bench")
    return _png(fig)


# ---------------------------------------------------------------- HTML


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6rem 0;font-size:13px}th,td{border:1px solid #ddd;padding:.25rem .55rem}
th{background:#f3f3f3;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#777}.bad{color:#b00020;font-weight:600}.ok{color:#1b7f3b}img{max-width:100%;display:block;
margin:.5rem 0}code{background:#f5f5f5;padding:0 .2rem}ul.notes li{margin:.15rem 0}
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = (),
           cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(f"<td class=\"n\">{c}</td>" if i in numeric else f"<td>{c}</td>"
                        for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table class=\"{cls}\"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(b64: str | None, alt: str) -> str:
    if b64 is None:
        return f"<p class=\"muted\">{_e(alt)}: nothing to plot.</p>"
    return f"<img alt=\"{_e(alt)}\" src=\"data:image/png;base64,{b64}\">"


def _stages_section(run: RunRecord) -> str:
    base = run.stages[0] if run.stages else None
    rows = []
    for s in run.stages:
        rows.append([_e(s.name), _e(s.kind), _e(s.method or "-"),
                     f"<code>{_e(s.artifact)}</code>" if s.artifact else "-", human_bytes(s.file_size), pct(s.val_acc),
                     human(s.params), human(s.trainable_params), human(s.macs),
                     _ratio_text(base.params if base else None, s.params),
                     _ratio_text(base.macs if base else None, s.macs),
                     "-" if s.seconds is None else f"{s.seconds:.1f} s"])
    headers = ["stage", "kind", "method", "artifact", "file size", "val accuracy", "params",
               "trainable params", "MACs", "params vs first", "MACs vs first", "time"]
    return "<h2 id=\"stages\">Stages</h2>" + _table(headers, rows, numeric=range(4, 12), cls="stages")


def _ratio_text(before: float | None, after: float | None) -> str:
    r = _ratio(before, after)
    return "-" if r is None else f"{r:.2f}x"


def _plan_section(run: RunRecord) -> str:
    if not run.plan:
        return "<h2 id=\"plan\">Plan</h2><p class=\"muted\">No plan recorded.</p>"
    rows = []
    for r in run.plan:
        scalars = ", ".join(f"{k} = {v:.4f}" for k, v in r.scalars.items()) or "-"
        rows.append([_e(r.unit), _e(r.method), _e(" + ".join(r.neighbours) or "-"), _e(scalars),
                     _e(r.detail or "-")])
    return "<h2 id=\"plan\">Plan</h2>" + _table(["unit", "method", "neighbours", "fitted scalars", "operation"],
                                                rows, cls="plan")


def _parity_section(run: RunRecord) -> str:
    rows = []
    for s in run.stages:
        for p in s.parity:
            rows.append([_e(s.name), _e(p.reference), f"{p.max_abs:.3g}", f"{p.max_rel:.3g}",
                         pct(p.top1_agreement), _e(p.inputs or "-")])
    if not rows:
        return "<h2 id=\"parity\">Parity</h2><p class=\"bad\">No stage recorded a parity check.</p>"
    return "<h2 id=\"parity\">Parity of fold and export</h2>" + _table(
        ["stage", "reference", "max abs error", "max rel error", "top-1 agreement", "checked on"], rows,
        numeric=(2, 3, 4), cls="parity")


def _bench_section(run: RunRecord) -> str:
    rows = bench_rows(run.bench)
    if not rows:
        return "<h2 id=\"latency\">Latency</h2><p class=\"bad\">No bench results in this run.</p>"
    base = {}
    for r in rows:
        base.setdefault(r.batch, r.median_ms)
    table = _table(["artifact", "backend", "batch", "median ms", "p90 ms", "images/s", "speed-up vs first"],
                   [[_e(r.artifact), _e(r.backend), r.batch, f"{r.median_ms:.3f}",
                     "-" if r.p90_ms is None else f"{r.p90_ms:.3f}",
                     "-" if r.throughput is None else f"{r.throughput:.1f}",
                     f"{base[r.batch] / r.median_ms:.2f}x"] for r in rows], numeric=range(2, 7), cls="bench")
    machine = (run.bench or {}).get("machine")
    note = f"<p class=\"muted\">Measured on {_e(_machine_line(machine))}.</p>" if machine else ""
    return "<h2 id=\"latency\">Latency</h2>" + _img(plot_latency(rows), "latency plot") + table + note


def _search_section(search: SearchRecord) -> str:
    r = search.result
    selection = r.get("selection") or {}
    choice = selection.get("choice") or {}
    accuracy = f"{pct(_number(r.get('val_acc_original')))} -> {pct(_number(r.get('val_acc')))}"
    headline = _table(["", "predicted", "measured"], [
        ["latency vs the original", _num(r.get("predicted_ratio", selection.get("predicted_ratio")), ".3f"),
         _num(r.get("latency_ratio"), ".3f")],
        ["latency, ms", _num(r.get("predicted_latency_ms"), ".2f"), _num(r.get("measured_latency_ms"), ".2f")],
        ["drop, points of agreement", _num(r.get("predicted_drop"), ".1f"), _num(r.get("measured_drop"), ".1f")],
        ["accuracy (original -> searched)", "-", accuracy],
    ], numeric=(1, 2), cls="search")
    stage = "skipped (0 local epochs)" if r.get("local_skipped") else "run" if r.get("local") else "not run"
    units = ", ".join(f"{_e(u)}: {_e(c)}" for u, c in choice.items()) or "none"
    start = r.get("start") or {}
    raced = (f"; the global stage went on from the {_e(start.get('chosen'))} start ({_e(race_summary(start))})"
             if start.get("chosen") else "")
    if r.get("contenders"):
        raced += (f"; {len(r['contenders'])} plans raced ("
                  + ", ".join(_e(c.get("name")) for c in r["contenders"]) + f"), {_e(r.get('kept'))} kept")
    facts = (f"<p>{len(choice)} units converted ({units}); local distillation {stage}{raced}; candidate table "
             f"{'reused' if r.get('table_reused') else 'built'}.</p>")
    rows = [[_e(p.get("name")), _e(p.get("kind")), _num(p.get("latency_ms"), ".3f"), pct(_number(p.get("accuracy"))),
             _num(p.get("speedup"), ".2f", "x"), _num(p.get("predicted_latency_ms"), ".3f"),
             _num(p.get("predicted_drop"), ".1f"), "yes" if p.get("pareto") else ""] for p in search.rows]
    pareto = (_table(["point", "kind", "latency ms", "agreement with the original", "speed-up", "predicted ms",
                      "predicted drop", "on the front"], rows, numeric=range(2, 7), cls="pareto") if rows
              else "<p class=\"muted\">search.json holds no Pareto rows.</p>")
    note = ("<p class=\"muted\">Predicted points are the candidate table's solves at latency budgets (latency "
            "and agreement predicted); the original and the searched model are measured together.</p>")
    return ("<h2 id=\"search\">Search</h2>" + headline + facts + _img(search.plot, "Pareto plot (pareto.png)")
            + pareto + note)


def _number(v: Any) -> float | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _num(v: Any, fmt: str, suffix: str = "") -> str:
    """``v`` formatted, or "-" when search.json has no number there."""
    return "-" if _number(v) is None else f"{v:{fmt}}{suffix}"


def _machine_line(m: dict | None) -> str:
    if not m:
        return "an unrecorded machine"
    versions = {**m, **m.get("versions", {})}  # bench nests the library versions under "versions"
    keys = ("cpu", "torch_threads", "torch", "onnxruntime")
    line = ", ".join(f"{k} {versions[k]}" for k in keys if versions.get(k) is not None)
    if m.get("load_average"):
        line += f", load average {m['load_average'][0]:.1f}"
    return line


def render_html(run: RunRecord, search: SearchRecord | None = None) -> str:
    """The page; with ``search``, a search section. A search folder alone (no stages) shows only that section."""
    data = run.data
    subtitle = [f"created {run.created}"]
    if data:
        subtitle.append(f"data: {data.get('name', '?')} ({data.get('split', 'val')} split, "
                        f"{data.get('images', '?')} images, input {data.get('input_size', '?')})")
    if run.seconds is not None:
        subtitle.append(f"total {run.seconds:.0f} s")
    notes = "".join(f"<li>{_e(n)}</li>" for n in run.notes)
    stage_notes = "".join(f"<li><b>{_e(s.name)}</b>: {_e(n)}</li>" for s in run.stages for n in s.notes)
    pipeline = bool(run.stages) or search is None
    parts = [
        f"<h1>{_e(run.title)}</h1><p class=\"muted\">{_e('; '.join(subtitle))}</p>",
        *(_pipeline_sections(run) if pipeline else []),
        _search_section(search) if search is not None else "",
        f"<h2 id=\"notes\">Notes</h2><ul class=\"notes\">{notes}{stage_notes}</ul>" if notes or stage_notes else "",
        f"<h2 id=\"machine\">Machine</h2><p class=\"muted\">{_e(_machine_line(run.machine))}; "
        f"{_e(run.machine.get('platform', ''))}; repconv "
        f"{_e(run.machine.get('versions', {}).get('repconv', __version__))}</p>" if pipeline else "",
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(run.title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _pipeline_sections(run: RunRecord) -> list[str]:
    return [_stages_section(run),
            "<h2 id=\"plots\">Accuracy, parameters and MACs</h2>",
            _img(plot_accuracy(run.stages), "accuracy plot"),
            _img(plot_size(run.stages), "parameters and MACs plot"),
            _plan_section(run),
            _parity_section(run),
            _bench_section(run)]


def write_report(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Render ``RUN_DIR/run.json`` (and ``RUN_DIR/search.json`` when there is one, see :func:`read_folder`) into
    one self-contained HTML page (default ``RUN_DIR/report.html``)."""
    run, search = read_folder(run_dir)
    target = Path(output) if output is not None else Path(run_dir) / "report.html"
    return write_text_atomic(target, render_html(run, search))


@dataclass
class ReportResult:
    path: Path
    run_dir: Path
    summary: dict

    def to_dict(self) -> dict:
        return {"report": str(self.path), "run_dir": str(self.run_dir), **self.summary}


def report(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> ReportResult:
    """Render ``RUN_DIR/run.json`` (and a search result beside it) as one self-contained HTML page (default
    ``RUN_DIR/report.html``)."""
    summary = summarize_run(*read_folder(run_dir))
    return ReportResult(write_report(run_dir, output), Path(run_dir), summary)
