"""The public Python API: one function per pipeline stage (see docs/architecture.md).

Each function takes paths or modules and returns a dataclass; nothing here prints.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from repconv.checkpoint import CheckpointMeta, Loaded
from repconv.checkpoint import load as _load_checkpoint
from repconv.checkpoint import save as _save
from repconv.convert.apply import apply_plan
from repconv.convert.graph import (
    Run,
    count_flops,
    count_params,
    example_input,
    find_runs,
    trace,
)
from repconv.convert.plan import Plan
from repconv.convert.replacement import replaced_units, select_units
from repconv.errors import NothingToReplace, PlanError

if TYPE_CHECKING:
    from repconv import demo as demo_module

__all__ = [
    "Conversion",
    "ConversionSummary",
    "ReportResult",
    "convert",
    "demo",
    "inspect",
    "load",
    "load_checkpoint",
    "report",
    "save",
    "summarize",
]

METHODS = ("replacement", "parameter-free", "both")

ModelLike = str | os.PathLike | nn.Module | Loaded


# ---------------------------------------------------------------- loading and saving


def load_checkpoint(model: ModelLike, *, arch: str | None = None, num_classes: int | None = None,
                    trust_pickle: bool = False) -> Loaded:
    """A path, a module or a Loaded -> Loaded (module + metadata)."""
    if isinstance(model, Loaded):
        return model
    if isinstance(model, nn.Module):
        from repconv.models import resolve_arch

        meta = CheckpointMeta.for_arch(resolve_arch(arch)) if arch else CheckpointMeta()
        return Loaded(model, meta)
    return _load_checkpoint(model, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)


def load(path: str | os.PathLike, *, arch: str | None = None, num_classes: int | None = None,
         trust_pickle: bool = False) -> nn.Module:
    """Read any checkpoint repconv accepts and return the module (converted ones come back converted)."""
    return load_checkpoint(path, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle).model


def save(path: str | os.PathLike, model: nn.Module, meta: CheckpointMeta) -> Path:
    return _save(path, model, meta)


# ---------------------------------------------------------------- inspect / convert


@dataclass
class ConversionSummary:
    arch: str | None
    method: str
    params_before: int
    params_after: int
    trainable_params: int
    flops_before: int
    flops_after: int
    macs_before: int
    macs_after: int
    replaced_units: list[str]
    steps: list[dict]
    runs: list[dict] = field(default_factory=list)
    parameter_free_targets: list[dict] = field(default_factory=list)
    opaque_modules: list[str] = field(default_factory=list)
    input_size: tuple[int, int, int] = (3, 224, 224)
    message: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Conversion:
    model: nn.Module  # the converted GraphModule
    plan: Plan
    meta: CheckpointMeta
    summary: ConversionSummary
    output: Path | None = None

    def save(self, path: str | os.PathLike) -> Path:
        self.output = _save(path, self.model, self.meta)
        return self.output


def _runs_table(runs: Sequence[Run]) -> list[dict]:
    return [{"container": r.container or "<root>", "members": list(r.members),
             "interior": list(r.interior), "params_per_member": r.params_per_member} for r in runs]


def plan_conversion(model: nn.Module, *, arch: str | None = None, method: str = "replacement", every: int = 2,
                    units: Sequence[str] | None = None, max_fraction: float | None = None, init: str = "half",
                    neighbor_grad: bool = False, leaves: Sequence[str] = (), pf_policy: str = "all",
                    pf_op: str = "max", pf_units: Sequence[str] | None = None) -> tuple[Plan, list[Run]]:
    """Choose what to change. Raises PlanError when the chosen method finds nothing to do."""
    if method not in METHODS:
        raise PlanError(f"unknown method '{method}'", f"use one of {', '.join(METHODS)}")
    runs = find_runs(model, opaque=leaves)
    steps: list = []
    if method in ("replacement", "both"):
        steps += select_units(runs, every=every, units=units, max_fraction=max_fraction,
                              total_params=count_params(model), init=init, neighbor_grad=neighbor_grad)
        if not steps and method == "replacement":
            raise NothingToReplace(_nothing_to_replace(runs), "choose another model or --method parameter-free")
    if method in ("parameter-free", "both"):
        from repconv.convert.parameter_free import plan_parameter_free

        steps += plan_parameter_free(model, policy=pf_policy, op=pf_op, units=pf_units,
                                     exclude=[s.unit for s in steps])
    return Plan(steps, arch, list(leaves)), runs


def _nothing_to_replace(runs: Sequence[Run]) -> str:
    if not runs:
        return "the model has no repeated unit (no consecutive siblings with identical parameter shapes)"
    longest = max(len(r.members) for r in runs)
    return (f"the model has {len(runs)} run(s) of repeated units but none with an interior member "
            f"(the longest run has {longest}; a replaced unit needs a neighbour on each side)")


def summarize(original: nn.Module, converted: nn.Module, plan: Plan, *, arch: str | None, method: str,
              input_size: Sequence[int], runs: Sequence[Run] = (), leaves: Sequence[str] = ()) -> ConversionSummary:
    x = example_input(input_size, batch=1)
    flops_before, flops_after = count_flops(original, x), count_flops(converted, x)
    return ConversionSummary(
        arch=arch, method=method,
        params_before=count_params(original), params_after=count_params(converted),
        trainable_params=count_params(converted, trainable_only=True),
        flops_before=flops_before, flops_after=flops_after,
        macs_before=flops_before // 2, macs_after=flops_after // 2,
        replaced_units=list(replaced_units(converted)),
        steps=[{"kind": s.kind, **asdict(s)} for s in plan.steps],
        runs=_runs_table(runs), opaque_modules=list(leaves), input_size=tuple(input_size))


def convert(model: ModelLike, *, arch: str | None = None, num_classes: int | None = None,
            method: str = "replacement", every: int = 2, units: Sequence[str] | None = None,
            max_fraction: float | None = None, init: str = "half", neighbor_grad: bool = False,
            plan: Plan | str | os.PathLike | None = None, leaves: Sequence[str] = (), pf_policy: str = "all",
            pf_op: str = "max", pf_units: Sequence[str] | None = None, trust_pickle: bool = False,
            output: str | os.PathLike | None = None) -> Conversion:
    """Rewrite a model into the chosen form. The input model is never modified."""
    loaded = load_checkpoint(model, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)
    if loaded.meta.kind == "converted":
        raise PlanError("the model is already converted", "convert the original checkpoint instead")
    original = loaded.model.eval()
    meta = copy.deepcopy(loaded.meta)
    leaves = list(Plan.load(plan).leaves if isinstance(plan, (str, os.PathLike)) else
                  plan.leaves if isinstance(plan, Plan) else ()) or list(leaves)
    gm = trace(copy.deepcopy(original), leaves)  # first, so an untraceable model is reported as such
    if plan is not None:
        plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        plan.leaves = leaves
        runs = find_runs(original, opaque=leaves)
    else:
        plan, runs = plan_conversion(original, arch=meta.arch, method=method, every=every, units=units,
                                     max_fraction=max_fraction, init=init, neighbor_grad=neighbor_grad,
                                     leaves=leaves, pf_policy=pf_policy, pf_op=pf_op, pf_units=pf_units)
    plan.arch = meta.arch
    apply_plan(gm, plan, model_for_init=original)
    gm.eval()
    meta.kind, meta.plan = "converted", plan
    summary = summarize(original, gm, plan, arch=meta.arch, method=method, input_size=meta.input_size,
                        runs=runs, leaves=leaves)
    result = Conversion(gm, plan, meta, summary)
    if output is not None:
        result.save(output)
    return result


def inspect(model: ModelLike, **options) -> ConversionSummary:
    """What ``convert`` with the same options would do, without writing anything.

    A model with nothing to replace is reported (``message``), not raised.
    """
    try:
        return convert(model, **options).summary
    except NothingToReplace as exc:
        loaded = load_checkpoint(model, arch=options.get("arch"), num_classes=options.get("num_classes"),
                                 trust_pickle=options.get("trust_pickle", False))
        leaves = options.get("leaves", ())
        runs = find_runs(loaded.model, opaque=leaves)
        x = example_input(loaded.meta.input_size, batch=1)
        flops = count_flops(loaded.model, x)
        params = count_params(loaded.model)
        return ConversionSummary(loaded.meta.arch, options.get("method", "replacement"), params, params,
                                 count_params(loaded.model, True), flops, flops, flops // 2, flops // 2, [], [],
                                 runs=_runs_table(runs), opaque_modules=list(leaves),
                                 input_size=loaded.meta.input_size, message=str(exc))


def check_round_trip(conversion: Conversion, path: str | os.PathLike) -> float:
    """Max abs difference between the in-memory converted model and the one re-loaded from ``path``."""
    x = example_input(conversion.meta.input_size, batch=2, seed=1)
    reloaded = load(path)
    with torch.no_grad():
        return float((conversion.model.eval()(x) - reloaded.eval()(x)).abs().max())


# ---------------------------------------------------------------- see it (issue 5): demo, report


@dataclass
class ReportResult:
    path: Path
    run_dir: Path
    summary: dict

    def to_dict(self) -> dict:
        return {"report": str(self.path), "run_dir": str(self.run_dir), **self.summary}


def report(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> ReportResult:
    """Render ``RUN_DIR/run.json`` as one self-contained HTML page (default ``RUN_DIR/report.html``)."""
    from repconv.report import read_run, summarize_run, write_report

    summary = summarize_run(read_run(run_dir))
    return ReportResult(write_report(run_dir, output), Path(run_dir), summary)


def demo(out: str | os.PathLike = "repconv-demo", *, quick: bool = False, progress: bool = True,
         say=None) -> demo_module.DemoResult:
    """The whole pipeline offline on the bundled digits data; artifacts, run.json and report.html in ``out``."""
    from repconv.demo import run_demo

    return run_demo(out, quick=quick, progress=progress, say=say)

