"""`repconv demo`: the whole pipeline, offline, on the bundled digits data.

Train a small ResNet (or reuse it from ``--out``), convert it twice (Replacement Learning; parameter-free
hybrid), calibrate and fine-tune, fold, export ONNX (fp32 and int8), verify every stage, benchmark,
and leave the artifacts, ``run.json`` and ``report.html`` in the output folder. Every number in
``run.json`` is measured here; a stage whose piece is missing is recorded as missing, never invented.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repconv.checkpoint import load, load_checkpoint
from repconv.conversion import check_round_trip, convert, fold
from repconv.convert.graph import count_flops, count_params, example_input
from repconv.data import make_dataset
from repconv.errors import InputFileError, OutputError, VerificationError
from repconv.export.deploy import export
from repconv.onnx_graph import ort_session, run_onnx
from repconv.report import RUN_FILE, ParityRecord, PlanRow, RunRecord, Stage, write_report
from repconv.runtime.bench import bench
from repconv.runtime.measure import machine_info
from repconv.train.loop import evaluate
from repconv.train.recover import calibrate, finetune, train

__all__ = ["DemoResult", "demo"]

DATA = "digits"


@dataclass(frozen=True)
class DemoConfig:
    arch: str = "cifar_resnet20"
    train_epochs: int = 8
    finetune_epochs: int = 2
    pf_finetune_epochs: int = 3
    calib_batches: int = 4  # batches of 32 images the scalars are fitted on
    calib_iters: int = 20  # L-BFGS iterations
    finetune_train: str = "scalars"  # what the replacement model trains: scalars | norm | all
    finetune_batches: int | None = None  # batches per fine-tuning epoch (None: the whole training split)
    # A basic block has two 3x3 convs and no 1x1 around them: replacing both (all targets) leaves a network of
    # pools. As a bottleneck's 3x3 is replaced between its 1x1s, the first conv of each block becomes the pool.
    pf_units: tuple[str, ...] = ("layer*.conv1",)
    bench_batches: tuple[int, ...] = (1, 16)
    bench_repeats: int = 30
    exporter: str = "dynamo"


FULL = DemoConfig()
QUICK = DemoConfig(train_epochs=3, calib_batches=2, calib_iters=10, finetune_epochs=1, pf_finetune_epochs=1,
                   finetune_batches=8, bench_batches=(1,), bench_repeats=10, exporter="legacy")


@dataclass
class DemoResult:
    out: Path
    run: RunRecord
    report: Path

    def to_dict(self) -> dict[str, Any]:
        from repconv.report import summarize_run

        return {"out": str(self.out), "run": str(self.out / RUN_FILE), "report": str(self.report),
                "seconds": self.run.seconds, "latency_b1_ms": self.latency_b1(),
                **summarize_run(self.run)}

    def latency_b1(self) -> dict[str, float] | None:
        """Stage name -> median batch-1 latency (ms) from the bench, for the stages that were benchmarked."""
        from repconv.report import bench_rows

        if self.run.bench is None:
            return None
        by_file = {r.artifact: r.median_ms for r in bench_rows(self.run.bench) if r.batch == 1}
        return {s.name: by_file[Path(s.artifact).name] for s in self.run.stages
                if s.artifact and Path(s.artifact).name in by_file}


Say = Callable[[str], None]


class _Steps:
    """Numbered stage headers on stderr and each stage's wall time."""

    def __init__(self, total: int, say: Say):
        self.total, self.done, self.say = total, 0, say

    @contextlib.contextmanager
    def __call__(self, what: str) -> Iterator[dict]:
        self.done += 1
        self.say(f"[{self.done}/{self.total}] {what}")
        timing: dict = {}
        start = time.perf_counter()
        yield timing
        timing["seconds"] = time.perf_counter() - start


# ---------------------------------------------------------------- measuring artifacts


def _val_set(meta):
    return make_dataset(DATA, "val", meta.input_size, meta.mean, meta.std)


def _torch_accuracy(model: nn.Module, val_set) -> float:
    return evaluate(model, val_set)


def _onnx_accuracy(path: Path, val_set) -> float:
    x, y = val_set.tensors
    logits = run_onnx(ort_session(path), x)
    return float((torch.from_numpy(logits).argmax(1) == y).float().mean())


def _macs(model: nn.Module, meta) -> int:
    return count_flops(model, example_input(meta.input_size, batch=1)) // 2


def _size(path: Path | None) -> int | None:
    return path.stat().st_size if path is not None and path.exists() else None


def _rel(out: Path, path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- stages


def _original(run: RunRecord, out: Path, cfg: DemoConfig, step, progress: bool) -> Path:
    path = out / "original.repconv.safetensors"
    if path.exists():
        with step(f"reusing the trained {cfg.arch} from {path}") as t:
            loaded = load_checkpoint(path)
            from repconv.models import resolve_arch

            if loaded.meta.arch != resolve_arch(cfg.arch).name:
                raise InputFileError(f"'{path}' holds a {loaded.meta.arch}, not the demo's {cfg.arch}",
                                     "delete it or choose another {option}", option="out")
            acc = _torch_accuracy(loaded.model, _val_set(loaded.meta))
        note = ["reused from the output folder (delete it to train again)"]
    else:
        with step(f"training {cfg.arch} on digits ({cfg.train_epochs} epochs)") as t:
            trained = train(cfg.arch, data=DATA, output=path, replace=False, epochs=cfg.train_epochs,
                                warmup_epochs=0.5, progress=progress)
            loaded = load_checkpoint(path)
            acc = _torch_accuracy(loaded.model, _val_set(loaded.meta))
        note = [f"trained from scratch for {trained.epochs} epochs; final train loss {trained.train_loss:.4f}"]
        _drop_resume_state(path)
    params = count_params(loaded.model)
    run.add(Stage("original", "model", None, _rel(out, path), _size(path), acc, params, params,
                  _macs(loaded.model, loaded.meta), [], t["seconds"], note))
    return path


def _drop_resume_state(path: Path) -> None:
    """Training writes OUTPUT.state.pt to resume from; the demo keeps only its artifacts (and metrics)."""
    Path(f"{path}.state.pt").unlink(missing_ok=True)


def _convert(run: RunRecord, out: Path, original: Path, name: str, step, **options) -> tuple[Path, Any]:
    path = out / f"{name}.repconv.safetensors"
    with step(f"converting: {name}") as t:
        conv = convert(original, output=path, **options)
        round_trip = check_round_trip(conv, path)
        acc = _torch_accuracy(conv.model, _val_set(conv.meta))
    s = conv.summary
    parity = [ParityRecord("in-memory conversion", round_trip, round_trip, None, "reloaded file vs in-memory model")]
    run.add(Stage(name, "converted", options["method"], _rel(out, path), _size(path), acc, s.params_after,
                  s.trainable_params, s.macs_after, parity, t["seconds"]))
    return path, conv


def _calibrate(run: RunRecord, out: Path, converted: Path, original: Path, cfg: DemoConfig, step) -> Path:
    path = out / "replacement-calibrated.repconv.safetensors"
    with step("calibrating the replaced units' scalars (function space)") as t:
        cal = calibrate(converted, teacher=original, data=DATA, output=path, batches=cfg.calib_batches,
                            max_iter=cfg.calib_iters)
    prev = run.stage("replacement")
    scalars = ", ".join(f"{u['unit']}: a {u['a_before']:.3f} -> {u['a']:.3f}, b {u['b_before']:.3f} -> {u['b']:.3f}"
                        for u in cal.units)
    run.add(Stage("replacement-calibrated", "calibrated", "replacement", _rel(out, path), _size(path), cal.val_acc,
                  prev.params, prev.trainable_params, prev.macs, [], t["seconds"],
                  [f"fitted on {cal.images} images: KL to the original {cal.kl_before:.4f} -> {cal.kl_after:.4f}; "
                   f"{scalars}"]))
    return path


def _finetune(run: RunRecord, out: Path, source: Path, original: Path, name: str, method: str, train: str,
              epochs: int, cfg: DemoConfig, step, progress: bool) -> Path:
    path = out / f"{name}.repconv.safetensors"
    with step(f"fine-tuning {name} (distillation + labels, training {train}, {epochs} epochs)") as t:
        res = finetune(source, data=DATA, output=path, teacher=original, objective="both", train=train,
                           epochs=epochs, lr=3e-3, batches_per_epoch=cfg.finetune_batches, progress=progress)
    prev = run.stages[-1]
    run.add(Stage(name, "finetuned", method, _rel(out, path), _size(path), res.val_acc, res.total_params,
                  res.trainable_params, prev.macs, [], t["seconds"],
                  [f"{res.epochs} epochs, objective {res.objective}, trained: {res.train}"]))
    _drop_resume_state(path)
    return path


def _fold(run: RunRecord, out: Path, source: Path, name: str, step) -> Path:
    path = out / f"{name}.safetensors"
    reference = run.stages[-1]
    with step(f"folding {reference.name} into static weights") as t:
        res = fold(source, output=path)
        acc = _torch_accuracy(res.model, _val_set(res.meta))
    parity = [ParityRecord(reference.name, res.parity.max_abs, res.parity.max_rel, None,
                     f"random inputs, batch {', '.join(map(str, res.parity.batch_sizes))}")]
    params = count_params(res.model)
    notes = [f"original architecture: {res.original_architecture}; folded units: {', '.join(res.folded_units)}",
             *res.warnings]
    run.add(Stage(name, "folded", reference.method, _rel(out, path), _size(path), acc, params, None,
                  _macs(res.model, res.meta), parity, t["seconds"], notes))
    return path


def _export(run: RunRecord, out: Path, source: Path, name: str, dtype: str, cfg: DemoConfig, step,
            say: Say) -> Path | None:
    """Stage ``NAME-onnx[-DTYPE]``, file ``NAME[-DTYPE].onnx``."""
    suffix = "" if dtype == "fp32" else f"-{dtype}"
    path, name = out / f"{name}{suffix}.onnx", f"{name}-onnx{suffix}"
    reference = run.stages[-1] if dtype == "fp32" else next(s for s in reversed(run.stages) if s.kind != "onnx")
    with step(f"exporting {reference.name} to ONNX {dtype}") as t:
        options = {"calib": DATA, "check_images": DATA} if dtype == "int8" else {}
        try:
            res = export(source, path, dtype=dtype, exporter=cfg.exporter,
                             progress=lambda m: say(f"      {m}"), **options)
        except VerificationError as exc:
            if dtype == "fp32":
                raise
            refused = exc
        else:
            refused = None
            acc = _onnx_accuracy(path, _val_set(load_checkpoint(source).meta))
    if refused is not None:  # a lower precision that fails its check is reported, and the demo goes on
        note = f"NOT EXPORTED: {dtype} failed verification: {refused}"
        say(note)
        run.notes.append(f"{name}: {note}")
        run.add(Stage(name, "onnx", reference.method, None, None, None, None, None, None, [], t["seconds"], [note]))
        return None
    parity = [ParityRecord("pytorch" if c.reference == "pytorch" else f"onnx fp32 ({c.stage} step)", c.max_abs,
                     c.max_rel, c.top1_agreement, f"{c.stage}: {c.inputs}, batch {list(c.batch_sizes)}")
              for c in res.checks]
    run.add(Stage(name, "onnx", reference.method, _rel(out, path), res.file_size, acc, None, None, None, parity,
                  t["seconds"], [f"opset {res.opset}, {res.exporter} exporter, ORT level {res.ort_level}",
                                 *res.warnings]))
    return path


def _plan_rows(finetuned: Path, pf_conversion) -> list[PlanRow]:
    from repconv.convert.replacement import replaced_units

    rows = [PlanRow("replacement", unit, [s.prev, s.next], {"a": s.a.item(), "b": s.b.item()})
            for unit, s in replaced_units(load(finetuned)).items()]
    if pf_conversion is not None:
        from repconv.convert.parameter_free import describe_step

        rows += [PlanRow("parameter-free", s.target, [], {}, describe_step(s) +
                         (f" (absorbs {', '.join(s.absorbed)})" if s.absorbed else ""))
                 for s in pf_conversion.plan.parameter_free_steps]
    return rows


def _bench(run: RunRecord, out: Path, artifacts: list[Path], cfg: DemoConfig, step, say: Say) -> None:
    with step(f"benchmarking {len(artifacts)} artifacts, batch {', '.join(map(str, cfg.bench_batches))}"):
        res = bench([str(p) for p in artifacts], batches=cfg.bench_batches, repeats=cfg.bench_repeats,
                        json_out=out / "bench.json", progress=lambda m, *_: say(f"      {m}"))
    run.bench = res.to_dict()
    # the demo's own work keeps the load near its thread count, so judge by the load before it started
    load, cpus = run.machine.get("load_average"), run.machine.get("cpu_count") or 1
    if load and load[0] > 0.5 * cpus:
        run.notes.append(f"the machine was busy before the demo started (load average {load[0]:.1f} on {cpus} "
                         "cores): latencies are noisy")


# ---------------------------------------------------------------- the demo


def demo(out: str | Path = "repconv-demo", *, quick: bool = False, progress: bool = True,
         say: Say | None = None) -> DemoResult:
    """Run the whole pipeline into ``out``; returns the run record and the report's path."""
    say = say or (lambda _m: None)
    cfg = QUICK if quick else FULL
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder '{out}' ({exc.strerror})",
                          "choose another {option}", option="out") from exc
    torch.manual_seed(0)
    start = time.perf_counter()
    run = RunRecord(title=f"repconv demo: {cfg.arch} on digits{' (quick)' if quick else ''}",
                    machine=machine_info("cpu"))
    step = _Steps(12, say)

    original = _original(run, out, cfg, step, progress)
    meta = load_checkpoint(original).meta
    run.data = {"name": DATA, "split": "val", "images": len(_val_set(meta)), "input_size": list(meta.input_size)}

    rep, _ = _convert(run, out, original, "replacement", step, method="replacement")
    rep = _calibrate(run, out, rep, original, cfg, step)
    rep = _finetune(run, out, rep, original, "replacement-finetuned", "replacement", cfg.finetune_train,
                    cfg.finetune_epochs, cfg, step, progress)
    rep_finetuned = rep
    rep_folded = _fold(run, out, rep, "replacement-folded", step)
    rep_onnx = _export(run, out, rep_folded, "replacement", "fp32", cfg, step, say)
    rep_int8 = _export(run, out, rep_folded, "replacement", "int8", cfg, step, say)

    pf, pf_conv = _convert(run, out, original, "pf-hybrid", step, method="parameter-free", pf_policy="hybrid",
                           pf_units=list(cfg.pf_units))
    pf = _finetune(run, out, pf, original, "pf-hybrid-finetuned", "parameter-free", "all", cfg.pf_finetune_epochs,
                   cfg, step, progress)
    pf_folded = _fold(run, out, pf, "pf-hybrid-folded", step)
    pf_onnx = _export(run, out, pf_folded, "pf-hybrid", "fp32", cfg, step, say)

    run.plan = _plan_rows(rep_finetuned, pf_conv)
    _bench(run, out, [p for p in (original, rep_folded, rep_onnx, rep_int8, pf_onnx) if p is not None], cfg, step, say)
    run.seconds = time.perf_counter() - start
    run.save(out)
    report = write_report(out, out / "report.html")
    return DemoResult(out, run, report)
