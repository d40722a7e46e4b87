"""``repconv search``: build (or reuse) the candidate table, solve for a budget, convert, locally distill, recover
globally, then verify the result's measured latency and accuracy against the prediction. Under a latency budget
the table's plan races the uniform policies and the other timed plans that meet the budget through the first
global epoch(s), and the best goes on (:mod:`repconv.search.rivals`).

Files written under ``output`` (a folder):

* ``candidates.json``: the candidate table (the cache: a new budget on the same model, data, target and settings
  only re-solves); ``candidates.partial.json`` while the latency phase is still to run;
* ``searched.repconv.safetensors``: the converted and recovered checkpoint (``search.recover``: the refit raced,
  local distillation when ``options.local.epochs`` > 0, else ``SearchResult.local_skipped``, then global) with its plan
  (``meta.extra["search"]`` holds the selection); with its ``.state.pt`` / ``.metrics.jsonl`` while the global
  stage runs (``resume=True`` continues an interrupted search from the last finished phase / epoch);
* ``search.json``: the :class:`SearchResult` (``pareto``: the rows of the points ``pareto.png`` plots);
  ``pareto.png``: the table's predicted frontier, the original and the result.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from repconv.convert.graph import device_of
from repconv.errors import DataError, OptionError, OutputError
from repconv.formatting import race_summary
from repconv.options import Device, Objective, Refit, Rival, check_choices
from repconv.search.candidates import KINDS, assemble_plan, enumerate_candidates
from repconv.search.damage import DamageOptions, build_views, measure_damage
from repconv.search.data import batches_on, image_list, load_data
from repconv.search.latency import check_target, measure_models, measure_unit_deltas
from repconv.search.measured import MeasuredSelection, Probe, check_latency_options, select_measured
from repconv.search.pareto import Point, pareto_table, plot
from repconv.search.recover import global_stage, prepare_starts
from repconv.search.rivals import SEARCHED, Contender, contenders
from repconv.search.select import Selection, check_budget, fastest, select
from repconv.search.table import CandidateTable, Figures, data_digest, load_table, model_digest, now_utc, table_key
from repconv.train.local import LocalOptions, LocalResult
from repconv.train.loop import state_path_for
from repconv.train.race import check_rungs

TABLE_FILE, PARTIAL_FILE = "candidates.json", "candidates.partial.json"
CHECKPOINT_FILE, RESULT_FILE, PLOT_FILE = "searched.repconv.safetensors", "search.json", "pareto.png"


@dataclass
class SearchOptions:
    """Everything that decides the candidate table (``table_settings``) and the recovery of the result."""

    target: str = "ort-cpu"
    device: Device = "cpu"  # where the table's candidates, the refit and the local stage train, and torch targets run
    threads: int = 2
    latency_batch: int = 1
    latency_rounds: int = 20  # per-unit timings: 20 rounds halve 5 rounds' spread for +4 s (results.md 2.7h)
    latency_block: int = 10
    latency_warmup: int = 2
    kinds: tuple[str, ...] = KINDS
    units: tuple[str, ...] | None = None  # globs: only these units are candidates (None: every unit)
    damage: DamageOptions = field(default_factory=DamageOptions)
    train_images: int | None = 1024  # images for the table's local distillation (None: all)
    eval_images: int = 256  # held-out images scoring each candidate
    # least-squares refit of the layer after each new pool (calibrate's); auto: raced against no refit in the
    # global stage (search/recover.py)
    refit: Refit = "auto"
    # the race's rungs (train/race.py): (1,): every start trains one epoch and the best continues; (1, 3): the
    # better half of the field go on to epoch 3 first. One epoch judged resnet50's plans best, 3 seeds (2.7k)
    race_epochs: tuple[int, ...] = (1,)
    # under a latency budget, the table's plan races these uniform policies where they meet the budget when timed,
    # then the other timed plans that met it (search/rivals.py); race_plans caps the plans raced (1: the table's
    # plan alone). Needs the global stage and no local stage.
    rivals: tuple[Rival, ...] = ("pf-hybrid", "pf-all", "replace-every-2")
    race_plans: int = 3
    refit_images: int = 256  # images (batches of 64) the refit reads
    # the assembled model's local stage (epochs 0, the default: skip it; it lost to global epochs, results 2.7f)
    local: LocalOptions = field(default_factory=lambda: LocalOptions(epochs=0))
    global_epochs: int = 3  # 0: skip the global stage
    global_lr: float = 3e-3  # measured better than 1e-3 for converted models (docs/results.md 2.7a)
    global_objective: Objective = "distill"  # labels needed for both / ce
    batches_per_epoch: int | None = None  # cap for the assembled model's local and global stages (quick runs)
    verify_rounds: int = 5
    latency_checks: int = 3  # plans timed after the first to meet a latency budget (0: trust the table)
    latency_tolerance: float = 0.03  # an assembled plan meets a latency budget within this fraction of it
    seed: int = 0

    def __post_init__(self) -> None:
        check_choices(self)
        for name, value in (("local_epochs", self.local.epochs), ("global_epochs", self.global_epochs)):
            if value < 0:
                raise OptionError(name, value, "must not be negative", "give 0 to skip the stage, or more epochs")
        self.rivals = tuple(self.rivals)
        if self.race_plans < 1:
            raise OptionError("race_plans", self.race_plans, "must be at least 1",
                              "give 1 to keep the table's plan, or the most plans to race, e.g. 3")
        self.race_epochs = check_rungs(self.race_epochs)
        if not self.global_lr > 0:
            raise OptionError("global_lr", self.global_lr, "is not positive", "give a learning rate such as 1e-3")
        check_latency_options(self.latency_checks, self.latency_tolerance)
        if self.refit_images < 4:
            raise OptionError("refit_images", self.refit_images, "is too few for the refit (every 4th is held out)",
                              "give 4 or more, or turn the refit off")

    def races_plans(self, latency_budget: float | None) -> bool:
        """Whether plans race (``search.rivals``): a latency budget, a global stage to race in, no local stage."""
        return latency_budget is not None and self.race_plans > 1 and self.skip_local and self.global_epochs > 0

    @property
    def skip_local(self) -> bool:
        """The assembled model goes from conversion straight to the global stage (``local.epochs == 0``)."""
        return self.local.epochs == 0

    def table_settings(self, input_shape: Sequence[int]) -> dict:
        return {"target": self.target, "device": self.device, "threads": self.threads, "batch": self.latency_batch,
                "rounds": self.latency_rounds, "block": self.latency_block, "kinds": list(self.kinds),
                "units": None if self.units is None else list(self.units),
                "damage": self.damage.to_dict(), "train_images": self.train_images, "eval_images": self.eval_images,
                "input_shape": list(input_shape), "seed": self.seed}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchResult:
    selection: Selection
    plan: dict
    output: Path
    checkpoint: Path | None
    table_path: Path
    table_reused: bool
    base_latency_ms: float  # the original, measured with the result (same run, interleaved)
    measured_latency_ms: float
    predicted_latency_ms: float
    predicted_drop: float  # points of agreement with the original, from the table
    agreement_after_local: float | None
    agreement: float | None  # with the original, on the held-out images, after global recovery
    val_acc_original: float | None
    val_acc: float | None
    local: dict | None = None
    global_history: list[dict] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    plot: Path | None = None
    local_skipped: bool = False  # the plan was converted but options.local.epochs was 0: agreement_after_local None
    pareto: list[dict] = field(default_factory=list)  # pareto.pareto_table rows of the plotted points
    refit: dict | None = None  # the assembled model's least-squares refit (None: off, or no pool to refit)
    start: dict | None = None  # train.race.RaceResult: where the global stage started (refit auto), None: no race
    latency_probes: list[dict] = field(default_factory=list)  # measured.Probe of each assembled plan timed to select
    kept: str = SEARCHED  # the plan kept: the table's ("searched"), another that met the budget, or a uniform policy
    contenders: list[dict] = field(default_factory=list)  # rivals.Contender of each plan raced (empty: no race)

    @property
    def latency_ratio(self) -> float:
        return self.measured_latency_ms / self.base_latency_ms

    @property
    def predicted_ratio(self) -> float:
        """The predicted latency as a fraction of the original's (interpolated between timed plans for a latency
        budget; the table's for a maximum drop)."""
        return self.predicted_latency_ms / self.selection.base_latency_ms

    @property
    def latency_error(self) -> float:
        """Predicted over measured ratio, minus 1 (both relative to the original measured beside them)."""
        return self.predicted_ratio / self.latency_ratio - 1

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "selection"}
        d = {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}
        return d | {"selection": self.selection.to_dict(), "latency_ratio": self.latency_ratio,
                    "predicted_ratio": self.predicted_ratio, "latency_error": self.latency_error,
                    "measured_drop_after_local": None if self.agreement_after_local is None
                    else 100 * (1 - self.agreement_after_local),
                    "measured_drop": None if self.agreement is None else 100 * (1 - self.agreement)}


# ---------------------------------------------------------------- the table


def build_table(teacher: nn.Module, train_set, val_set, *, options: SearchOptions | None = None,
                cache: str | os.PathLike | None = None, refresh: bool = False, leaves: Sequence[str] = (),
                progress: Callable[[str], None] | None = None) -> tuple[CandidateTable, bool]:
    """The candidate table of ``teacher`` on this data and target; (table, reused from ``cache``).

    A cache for other weights, data, target or settings raises InputFileError unless ``refresh`` (then the table
    is measured again and the cache overwritten)."""
    options = options or SearchOptions()
    say = progress or (lambda _m: None)
    check_target(options.target, options.device)
    teacher.eval()
    torch.manual_seed(options.seed)
    train_batches = image_list(train_set, options.train_images, options.damage.batch_size)
    eval_batches = image_list(val_set, options.eval_images, 128)
    if not train_batches or not eval_batches:
        raise DataError("the search data holds no images", "give a folder with images")
    units = enumerate_candidates(teacher, leaves=leaves, kinds=options.kinds, units=options.units)
    work = on_device(teacher, options.device)
    example = eval_batches[0][:1].expand(options.latency_batch, *eval_batches[0].shape[1:]).contiguous()
    settings = options.table_settings(example.shape)
    key = table_key(model_digest(teacher), data_digest(train_batches + eval_batches), options.target, settings)
    cache = Path(cache) if cache is not None else None
    if cache is not None and cache.exists() and not refresh:
        return load_table(cache, expect_key=key, expect_units=[u.unit for u in units]), True
    partial = cache.with_name(cache.stem + ".partial.json") if cache is not None else None
    seconds: dict = {}
    views = build_views(work, units)
    damage = None
    if partial is not None and partial.exists() and not refresh:
        saved = json.loads(partial.read_text())
        if saved.get("key") == key:
            damage = saved["damage"]
            say(f"reusing the damage phase from {partial}")
    if damage is None:
        t0 = time.perf_counter()
        say(f"measuring accuracy damage of {sum(len(v) for v in views.values())} candidates")
        damage = measure_damage(work, units, batches_on(work, train_batches), batches_on(work, eval_batches),
                                options.damage, views=views, progress=say)
        seconds["damage"] = round(time.perf_counter() - t0, 1)
        if partial is not None:
            from repconv.io import write_text_atomic

            write_text_atomic(partial, json.dumps({"key": key, "damage": damage}))
    t0 = time.perf_counter()
    say(f"measuring latency on {options.target}")
    timing = {"threads": options.threads, "device": options.device, "rounds": options.latency_rounds,
              "block": options.latency_block, "warmup": options.latency_warmup}
    deltas = measure_unit_deltas(teacher, views, example, options.target, progress=say, **timing)
    base = measure_models({"original": teacher}, example, options.target, **timing)["original"]
    seconds["latency"] = round(time.perf_counter() - t0, 1)
    figures = {}
    for u in units:
        for c in u.candidates[1:]:
            d = damage[c.key]
            figures[c.key] = Figures(damage=d["damage"], kl=d["kl"], latency_delta_ms=deltas[u.unit][c.name],
                                     unit_error=d["unit_error"], measured=c.name != "replace")
    table = CandidateTable(key, options.target, base, units, figures, model_digest(teacher),
                           data_digest(train_batches + eval_batches), settings, now_utc(), seconds)
    if cache is not None:
        table.save(cache)
        if partial is not None:
            partial.unlink(missing_ok=True)
    return table, False


# ---------------------------------------------------------------- verification helpers


def agreement(model: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """Top-1 agreement of ``model`` with ``teacher`` on ``batches`` (each run where its weights are)."""
    same = total = 0
    model.eval()
    with torch.no_grad():
        for x in batches:
            mine = model(x.to(device_of(model))).argmax(1).cpu()
            same += int((mine == teacher(x.to(device_of(teacher))).argmax(1).cpu()).sum())
            total += len(x)
    return same / max(total, 1)


def on_device(model: nn.Module, device: str) -> nn.Module:
    """``model`` itself on the CPU, else a copy on ``device`` (the original stays on the CPU, where it is timed and
    exported)."""
    return model if torch.device(device).type == "cpu" else copy.deepcopy(model).to(device)


def _labeled_accuracy(model: nn.Module, ds) -> float | None:
    from repconv.train.loop import evaluate

    try:
        ys = [ds[i][1] for i in range(min(len(ds), 4))]
    except Exception:
        return None
    if not ys or any(int(y) < 0 for y in ys):
        return None
    return evaluate(model, ds)


def latency_model(teacher: nn.Module, plan) -> nn.Module:
    """What runs at inference for ``plan``: replaced units fold back to the original architecture, so only the
    parameter-free steps change the graph."""
    from repconv.conversion import convert

    pf = plan.without_replacement()
    return convert(teacher, plan=pf).model if pf.steps else teacher


# ---------------------------------------------------------------- search


def search(model, data, output: str | os.PathLike, *, latency_budget: float | None = None,
           max_drop: float | None = None, options: SearchOptions | None = None, val_data=None,
           cache: str | os.PathLike | None = None, refresh: bool = False, resume: bool = False,
           progress: Callable[[str], None] | None = None, arch: str | None = None, num_classes: int | None = None,
           trust_pickle: bool = False) -> SearchResult:
    """Search a plan for ``model`` (an original checkpoint path, module or Loaded) under ``latency_budget`` (a
    fraction of the original's measured latency on ``options.target``) or ``max_drop`` (accuracy points), convert
    it, recover it (:mod:`repconv.search.recover`; 0 epochs skip a stage), verify it, and write the files listed
    in the module docstring under ``output``."""
    from repconv.checkpoint import load_checkpoint, save
    from repconv.io import write_text_atomic

    options = options or SearchOptions()
    say = progress or (lambda _m: None)
    started = time.perf_counter()
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise OutputError(f"search output '{out}' is a file", "give a folder (it is created)")
    loaded = load_checkpoint(model, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)
    if loaded.meta.kind == "converted":
        from repconv.errors import PlanError

        raise PlanError("search starts from an original model, and this one is already converted",
                        "give the original checkpoint")
    teacher = loaded.model.eval()
    meta = copy.deepcopy(loaded.meta)
    train_set, val_set = load_data(data, val_data, meta)
    check_target(options.target, options.device)
    # validate the budget before any measuring (an infeasible one is only known after the table)
    check_budget(latency_budget, max_drop)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise OutputError(f"cannot write to '{out}'", "choose another output folder")
    seconds: dict = {}
    t0 = time.perf_counter()
    table_path = Path(cache) if cache is not None else out / TABLE_FILE
    table, reused = build_table(teacher, train_set, val_set, options=options, cache=table_path, refresh=refresh,
                                leaves=meta.plan.leaves if meta.plan else (), progress=say)
    seconds["table"] = round(time.perf_counter() - t0, 1)
    eval_batches = image_list(val_set, options.eval_images, 128)
    example = eval_batches[0][:1].expand(options.latency_batch, *eval_batches[0].shape[1:]).contiguous()
    leaves = meta.plan.leaves if meta.plan else ()
    ckpt = out / CHECKPOINT_FILE
    t0 = time.perf_counter()
    prior = load_checkpoint(ckpt) if resume and ckpt.exists() else None  # an interrupted search's checkpoint
    info = prior.meta.extra.get("search", {}) if prior is not None else {}
    chosen = _resumed_selection(info, table, latency_budget, max_drop) if prior is not None else None
    resumed = chosen is not None  # then the race, if any, is over: its winner's selection was saved
    if chosen is None:
        chosen = _select(table, teacher, example, latency_budget, max_drop, options, leaves, say)
    field_ = [Contender(info.get("kept", SEARCHED) if resumed else SEARCHED, chosen.selection, chosen.probe)]
    if not resumed and options.races_plans(latency_budget) and chosen.selection.choice:
        field_ = contenders(table, chosen, latency_budget, options.latency_tolerance,
                            plan_measurer(table, teacher, example, options, leaves), model=teacher,
                            rivals=options.rivals, limit=options.race_plans, leaves=leaves, say=say)
    probes = chosen.probes + [c.probe for c in field_ if c.probe and c.probe not in chosen.probes]
    raced = info.get("contenders", []) if resumed else [c.to_dict() for c in field_] if len(field_) > 1 else []
    seconds["select"] = round(time.perf_counter() - t0, 3)
    plans = {c.name: assemble_plan(table.units, c.selection.choice, arch=meta.arch, leaves=leaves) for c in field_}
    kept = field_[0].name
    selection, plan = field_[0].selection, plans[kept]
    say(f"selected {len(selection.choice)} of {len(table.units)} units: predicted {chosen.predicted_ratio:.3f} of "
        f"the original's latency, drop {selection.predicted_drop:.1f} points")
    if len(field_) > 1:
        say(f"racing {len(field_)} plans: " + ", ".join(f"{c.name} ({len(c.selection.choice)} units)"
                                                         for c in field_))
    local_res: LocalResult | None = None
    history: list[dict] = []
    agree_local = None
    local_skipped = False
    refit_res = start = None
    if not plan.steps:
        student = copy.deepcopy(teacher)
    else:
        work = on_device(teacher, options.device)  # the teacher where the refit and the local stage run
        done_local = prior is not None and info.get("plan_digest") == plan.digest() and info.get("phase") in (
            "local", "global")
        if done_local:
            starts, owners, metas = {"resumed": prior.model}, {"resumed": kept}, {kept: copy.deepcopy(prior.meta)}
            local_skipped = bool(info.get("local_skipped", False))
            agree_local = info.get("agreement_after_local")  # measured when the local stage ended
            refits, start = {kept: info.get("refit")}, info.get("start")
            say("resuming after the local stage")
        else:
            extra = {"table_key": table.key, "probes": [p.to_dict() for p in probes],
                     "local_skipped": options.skip_local, "contenders": raced}
            prepared = _convert_contenders(loaded, field_, plans, work, train_set, options,
                                           batches_on(work, eval_batches), extra, say=say,
                                           progress=progress is not None)
            starts, owners, metas, refits = prepared.starts, prepared.owners, prepared.metas, prepared.refits
            local_res, local_skipped = prepared.local, prepared.local_skipped
            seconds |= prepared.seconds
        meta = metas[kept]
        student = next(iter(starts.values()))  # the first start (a local stage leaves exactly one)
        if local_res is not None:
            agree_local = agreement(student, work, eval_batches)
            meta.extra["search"] |= {"phase": "local", "agreement_after_local": agree_local}
            save(ckpt, student, meta)
        if options.global_epochs > 0:

            def save_model(m: nn.Module, metrics: dict) -> None:
                meta.extra["search"] = meta.extra.get("search", {}) | {"phase": "global",
                                                                       "epoch": metrics.get("epoch")}
                save(ckpt, m, meta)

            def on_start(race: dict) -> None:
                nonlocal meta, kept
                kept = owners[race["chosen"]]
                meta = metas[kept]  # the winner's plan is what the checkpoint holds from now on
                meta.extra["search"]["start"] = race
                say(f"the global stage continues from the {race['chosen']} model ({race_summary(race)})")

            stage = global_stage(starts, work, train_set, options, output=ckpt, save_model=save_model,
                                 on_start=on_start, resume=resume, progress=progress is not None, say=say)
            student, history, start = stage.model, stage.history, stage.start or start
            seconds["global"] = stage.seconds
        winner = next(c for c in field_ if c.name == kept)
        selection, plan, refit_res = winner.selection, plans[kept], refits[kept]
        chosen = MeasuredSelection(selection, probes)
        student.cpu().eval()  # verified on the CPU beside the original
        meta.extra["search"] = meta.extra.get("search", {}) | {"phase": "done"}
        save(ckpt, student, meta)
        state_path_for(ckpt).unlink(missing_ok=True)  # the global stage's resume state: no longer needed
    t0 = time.perf_counter()
    say("verifying latency and accuracy against the prediction")
    measured = measure_models({"original": teacher, "searched": latency_model(teacher, plan)}, example,
                              options.target, threads=options.threads, device=options.device,
                              rounds=options.verify_rounds, block=options.latency_block,
                              warmup=options.latency_warmup)
    agree = agreement(student, teacher, eval_batches)
    result = SearchResult(selection, plan.to_dict(), out, ckpt if plan.steps else None, table_path, reused,
                          measured["original"], measured["searched"],
                          chosen.predicted_ratio * selection.base_latency_ms,
                          selection.predicted_drop, agree_local, agree, _labeled_accuracy(teacher, val_set),
                          _labeled_accuracy(student, val_set), local_res.to_dict() if local_res else None, history,
                          local_skipped=local_skipped, refit=refit_res, start=start,
                          latency_probes=[p.to_dict() for p in probes], kept=kept, contenders=raced)
    seconds["verify"] = round(time.perf_counter() - t0, 1)
    seconds["total"] = round(time.perf_counter() - started, 1)
    result.seconds = seconds
    points = frontier_points(table, result)
    result.pareto = pareto_table(points, result.base_latency_ms)
    try:
        result.plot = plot(points, out / PLOT_FILE, title=f"{table.target}: agreement with the original vs latency")
    except ImportError:
        result.plot = None
    write_text_atomic(out / RESULT_FILE, json.dumps(result.to_dict(), indent=2) + "\n")
    return result


@dataclass
class _Starts:
    """Every contender converted: the global stage's starts (name -> model) and the plan each converts; each plan's
    checkpoint meta and refit."""

    starts: dict[str, nn.Module] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)
    metas: dict = field(default_factory=dict)
    refits: dict[str, dict | None] = field(default_factory=dict)
    local: LocalResult | None = None  # a local stage runs for a single plan only (SearchOptions.races_plans)
    local_skipped: bool = False
    seconds: dict = field(default_factory=dict)


def _convert_contenders(loaded, field_: Sequence[Contender], plans: dict, teacher: nn.Module, train_set,
                        options: SearchOptions, eval_batches: Sequence[torch.Tensor], extra: dict, *,
                        say: Callable[[str], None], progress: bool) -> _Starts:
    """Convert each contender's plan and make its starts (``recover.prepare_starts``: the refit, the local stage);
    with several plans each start is named for its plan (``pf-hybrid``, ``pf-hybrid+refit``). ``extra``: what
    every plan's ``meta.extra["search"]`` holds besides its own selection."""
    from repconv.conversion import convert

    out = _Starts()
    for c in field_:
        conv = convert(loaded, plan=plans[c.name])
        meta = out.metas[c.name] = copy.deepcopy(conv.meta)
        meta.extra["search"] = {"phase": "converted", "plan_digest": plans[c.name].digest(), "kept": c.name,
                                "selection": c.selection.to_dict(), **extra}
        prepared = prepare_starts(conv.model.to(device_of(teacher)), teacher, train_set, plans[c.name], options,
                                  eval_batches, say=say, progress=progress)
        for name, model in prepared.models.items():
            name = name if len(field_) == 1 else c.name if name == "converted" else f"{c.name}+{name}"
            out.starts[name], out.owners[name] = model, c.name
        out.local, out.local_skipped, out.refits[c.name] = prepared.local, prepared.local_skipped, prepared.refit
        out.seconds |= prepared.seconds
        if prepared.refit:
            meta.extra["search"]["refit"] = {k: prepared.refit[k] for k in ("mean_error_before", "mean_error_after",
                                                                            "mode")}
    return out


def plan_measurer(table: CandidateTable, teacher: nn.Module, example: torch.Tensor, options: SearchOptions,
              leaves: Sequence[str]) -> Callable[[dict[str, str]], float]:
    """``measure(choice)``: the assembled plan's latency as a ratio of the original's, timed interleaved with it on
    the target."""

    def measure(choice: dict[str, str]) -> float:
        plan = assemble_plan(table.units, choice, leaves=leaves)
        ms = measure_models({"original": teacher, "assembled": latency_model(teacher, plan)}, example, options.target,
                            threads=options.threads, device=options.device, rounds=options.verify_rounds,
                            block=options.latency_block, warmup=options.latency_warmup)
        return ms["assembled"] / ms["original"]

    return measure


def _select(table: CandidateTable, teacher: nn.Module, example: torch.Tensor, latency_budget: float | None,
            max_drop: float | None, options: SearchOptions, leaves: Sequence[str],
            say: Callable[[str], None]) -> MeasuredSelection:
    """A latency budget is checked on the assembled model (:func:`measured.select_measured`); a maximum drop is
    solved on the table alone."""
    if latency_budget is None:
        return MeasuredSelection(select(table, max_drop=max_drop))
    return select_measured(table, latency_budget, plan_measurer(table, teacher, example, options, leaves),
                           checks=options.latency_checks, tolerance=options.latency_tolerance, progress=say)


def _resumed_selection(info: dict, table: CandidateTable, latency_budget: float | None,
                       max_drop: float | None) -> MeasuredSelection | None:
    """The selection an interrupted search on the same table and budget already made (``info``: its checkpoint's
    ``meta.extra["search"]``); its latency checks are not timed again: new timings could pick another plan and
    discard the finished stages."""
    saved = dict(info.get("selection") or {})
    if info.get("table_key") != table.key or (saved.get("latency_budget"), saved.get("max_drop")) != (
            latency_budget, max_drop):
        return None
    saved.pop("predicted_ratio", None)
    return MeasuredSelection(Selection(**saved), [Probe(**p) for p in info.get("probes", [])])


def predicted_frontier(table: CandidateTable, budgets: Sequence[float] | None = None) -> list[Selection]:
    """Selections across latency budgets from the table alone (instant: only solves)."""
    low = fastest(table).predicted_ratio
    budgets = budgets or [low + (1 - low) * i / 10 for i in range(11)]
    out = []
    for b in budgets:
        try:
            out.append(select(table, latency_budget=b))
        except Exception:  # below the fastest plan
            continue
    return out


def frontier_points(table: CandidateTable, result: SearchResult) -> list[Point]:
    """What ``pareto.png`` plots: the table's predicted frontier (named by predicted latency ratio), the original
    and the searched model (measured; agreement with the original as accuracy)."""
    # the drop adds per-unit damages, so it can pass 100 points on large plans: agreement stops at 0
    pts = [Point(f"{s.predicted_ratio:.2f}", "predicted", s.predicted_latency_ms, max(0.0, 1 - s.predicted_drop / 100))
           for s in predicted_frontier(table)]
    pts.append(Point("original", "original", result.base_latency_ms, 1.0))
    if result.agreement is not None:
        pts.append(Point("searched", "searched", result.measured_latency_ms, result.agreement,
                         result.predicted_latency_ms, result.predicted_drop))
    return pts
