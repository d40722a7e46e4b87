"""The one training loop behind ``finetune`` and ``train``: objectives, trainable sets, schedule, AMP,
gradient accumulation, per-epoch validation and checkpoints, exact resume, and DDP under ``torchrun``.

Resume works at epoch boundaries. After every epoch, rank 0 writes (atomically) the model file and a
state file holding the model, optimizer, scheduler, grad-scaler and RNG states and the epoch count.
The data order of an epoch is a function of (seed, epoch) only (``DistributedSampler.set_epoch``), so a
run killed anywhere (even with SIGKILL) and restarted with ``resume=True`` redoes the interrupted epoch
from the same state and ends with weights identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from repconv.convert.graph import device_of
from repconv.convert.measure import kl_to_teacher
from repconv.convert.replacement import replaced_units
from repconv.errors import InputFileError, OptionError
from repconv.io import atomic_path
from repconv.options import Amp, BnStatsChoice, Keep, Objective, Optimizer, Trainable, check_choices
from repconv.progress import progress
from repconv.train.recovery import (
    HOLDOUT_FRACTION,
    HOLDOUT_MAX,
    Judge,
    apply_bn_mode,
    holdout_split,
    recalibrate_stats,
)

STATE_VERSION = 2  # 2: best-so-far ("judge") state
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@dataclass
class TrainConfig:
    """Everything that decides the result of a run (a resumed run must use the same values)."""

    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: Optimizer = "adamw"
    momentum: float = 0.9
    weight_decay: float = 1e-4  # on weight matrices / kernels only (ndim >= 2)
    warmup_epochs: float = 0.0
    accum_steps: int = 1
    objective: Objective = "ce"
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the label loss in "both"
    trainable: Trainable = "all"
    amp: Amp = "auto"  # auto: fp16/bf16 on CUDA, off on CPU | on | off
    seed: int = 0
    workers: int = 0
    batches_per_epoch: int | None = None  # cap (short runs, tests)
    label_smoothing: float = 0.0
    # BatchNorm running statistics while training (repconv.train.recovery): finetune of a pretrained model
    # should pass "freeze"; "update" (PyTorch's train mode) is what training from scratch needs.
    bn_stats: BnStatsChoice = "update"  # "auto" is resolved by the stage (finetune); the loop alone reads it as update
    # What is written: "best" = the best epoch by the validation metric, or the input when no epoch beats it
    # (never worse); "best_epoch" = the best epoch (input not a candidate); "last" = the last epoch.
    keep: Keep = "last"
    # Without validation data but with a teacher: this fraction of the training data (at most holdout_max
    # images, seeded by ``seed``) is held out to measure agreement with the teacher. 0 disables it.
    holdout: float = HOLDOUT_FRACTION
    holdout_max: int = HOLDOUT_MAX

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        check_choices(self)
        for name in ("epochs", "batch_size", "accum_steps"):
            if getattr(self, name) < 1:
                raise OptionError(name, getattr(self, name), "must be at least 1", "give a positive integer")
        for name in ("lr", "weight_decay", "warmup_epochs", "temperature", "label_smoothing"):
            if getattr(self, name) < 0:
                raise OptionError(name, getattr(self, name), "must not be negative", "give 0 or more")
        if not 0 <= self.alpha <= 1:
            raise OptionError("alpha", self.alpha, "is outside [0, 1]", "give the label-loss weight, e.g. 0.5")
        if not 0 <= self.holdout < 1:
            raise OptionError("holdout", self.holdout, "is not a fraction in [0, 1)", "give e.g. 0.15, or 0 for none")


@dataclass
class FitResult:
    epochs: int
    history: list[dict] = field(default_factory=list)
    val_acc: float | None = None
    train_loss: float | None = None
    resumed_from_epoch: int | None = None
    world_size: int = 1
    ranks_in_sync: bool | None = None
    amp: str = "off"
    device: str = "cpu"
    trainable_params: int = 0
    bn_stats: str = "update"
    keep: str = "last"
    val_source: str | None = None  # "val" (the val_set given), "holdout" (split off the training data) or None
    holdout_images: int = 0
    select_metric: str | None = None  # "val_acc" (labels), "agreement" (with the teacher) or None
    input_metrics: dict | None = None  # the model as it came in, on the validation data
    agreement: float | None = None  # of the model written (top-1 agreement with the teacher)
    best_epoch: int | None = None  # 0: the input
    written: str = "last"  # "input" | "best epoch N" | "last"
    warning: str | None = None  # set (and logged) when training ended worse than its input
    recalibrated_images: int = 0


# ---------------------------------------------------------------- distributed


def dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _init_distributed(world: int) -> bool:
    """Join the process group torchrun set up; True when this call created it."""
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _ranks_in_sync(model: nn.Module, device: torch.device) -> bool | None:
    """Every rank must hold the same parameters at the end (checked with a checksum all-gather)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    with torch.no_grad():
        s = torch.stack([p.double().sum() for p in model.parameters()]).to(device)
    gathered = [torch.empty_like(s) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, s)
    return all(torch.equal(g, gathered[0]) for g in gathered)


# ---------------------------------------------------------------- what is trained


def classifier_params(model: nn.Module) -> list[str]:
    """Parameters of the last Linear layer (the classifier head)."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and any(p is not None for p in m._parameters.values()):
            last = name
    if last is None:
        return []
    return [f"{last}.{n}" for n, _ in model.get_submodule(last).named_parameters()]


def resolve_trainable(mode: str, model: nn.Module) -> str:
    """``auto``: every parameter where a parameter-free step of the model's plan (``model.meta["repconv_plan"]``,
    which every conversion carries) left no scalar to train for what it removed (docs/results.md 2.7a), else the
    replaced units' scalars, else every parameter. Other modes pass through."""
    if mode != "auto":
        return mode
    plan = getattr(model, "meta", {}).get("repconv_plan")
    if plan is not None and plan.parameter_free_steps:
        return "all"
    return "scalars" if replaced_units(model) else "all"


def set_trainable(model: nn.Module, mode: str) -> list[str]:
    """Freeze everything outside ``mode``'s set (``auto``: :func:`resolve_trainable`); return the names of the
    trainable parameters."""
    mode = resolve_trainable(mode, model)
    if mode == "all":
        names = {n for n, _ in model.named_parameters()}
    else:
        names = {f"{u}.replacement.{p}" for u in replaced_units(model) for p in ("a", "b")}
        if mode == "norm":
            names |= {f"{m}.{n}" for m, mod in model.named_modules() if isinstance(mod, _NORMS)
                      for n, _ in mod.named_parameters(recurse=False)}
            names |= set(classifier_params(model))
    if not names:
        raise OptionError("trainable", mode, "leaves nothing to train: the model has no replaced unit",
                          "train norm or all")
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return [n for n, _ in model.named_parameters() if n in names]


# ---------------------------------------------------------------- pieces of a step


def objective_loss(cfg: TrainConfig, logits: torch.Tensor, labels: torch.Tensor,
                   teacher_logits: torch.Tensor | None) -> torch.Tensor:
    logits = logits.float()
    ce = kd = None
    if cfg.objective in ("ce", "both"):
        ce = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
    if cfg.objective in ("distill", "both"):
        t = cfg.temperature
        kd = kl_to_teacher(logits / t, teacher_logits / t) * t * t
    if ce is None:
        return kd
    if kd is None:
        return ce
    return cfg.alpha * ce + (1 - cfg.alpha) * kd


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": other, "weight_decay": 0.0}) if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _schedule(opt: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay to zero, stepped once per optimizer step."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _amp(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a grad scaler). CPU: off unless asked (bf16 autocast on CPUs without
    native bf16 is slower than fp32 and changes results)."""
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type == "cpu"):
        return None, False
    if device.type == "cuda":
        return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
    return torch.bfloat16, False


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy (fraction) on a labeled dataset."""
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=batch_size):
            pred = model(x.to(device)).argmax(1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


# ---------------------------------------------------------------- state for resume


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_path_for(output: str | os.PathLike) -> Path:
    return Path(f"{output}.state.pt")


def metrics_path_for(output: str | os.PathLike) -> Path:
    return Path(f"{output}.metrics.jsonl")


def _load_state(path: Path, cfg: TrainConfig) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputFileError(f"cannot read the resume state '{path}' ({type(exc).__name__})",
                             "delete it to start over") from exc
    saved = json.loads(state["config"])
    defaults = asdict(TrainConfig())  # settings older state files lack had their default values
    differs = [k for k, v in asdict(cfg).items() if k != "workers" and saved.get(k, defaults[k]) != v]
    if differs:
        shown = ", ".join(f"{k}={saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in differs)
        raise InputFileError(f"'{path}' was written by a run with other settings: {shown}",
                             "resume with the same options, or delete the state file to start over")
    return state


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop lines of epochs the killed run logged after its last saved state."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("epoch", 0) <= epochs_done]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in lines))


# ---------------------------------------------------------------- the loop


def _progress(enabled: bool):
    if not enabled:  # needs no rich (a bare GPU machine may lack it)
        return progress(False)
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return progress(enabled, TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[stats]}"), TimeElapsedColumn())


def fit(model: nn.Module, train_set: Dataset, cfg: TrainConfig, *, val_set: Dataset | None = None,
        teacher: nn.Module | None = None, save_model: Callable[[nn.Module, dict], None] | None = None,
        output: str | os.PathLike | None = None, resume: bool = False, progress: bool = False,
        stop_after: int | None = None) -> FitResult:
    """Train ``model`` in place. ``save_model(model, epoch_metrics)`` writes the model file after every
    epoch (rank 0 only); with ``output``, a state file ``OUTPUT.state.pt`` and metrics ``OUTPUT.metrics.jsonl``
    are written beside it. ``stop_after=N`` trains only the schedule's first N epochs and leaves the model as
    the last of them (nothing is chosen or restored); ``resume=True`` on the same ``output`` continues it."""
    cfg.check()
    rank, world, local_rank = dist_env()
    created_group = _init_distributed(world)
    try:
        return _fit(model, train_set, cfg, val_set, teacher, save_model, output, resume, progress,
                    rank, world, _device(local_rank), stop_after)
    finally:
        if created_group:
            dist.destroy_process_group()


def _fit(model, train_set, cfg, val_set, teacher, save_model, output, resume, progress, rank, world, device,
         stop_after=None):
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    val_source, held = ("val" if val_set is not None else None), 0
    if val_set is None and teacher is not None and cfg.holdout > 0:
        train_set, val_set = holdout_split(train_set, cfg.holdout, cfg.holdout_max, cfg.seed)
        if val_set is not None:
            val_source, held = "holdout", len(val_set)
    trainable = set_trainable(model, cfg.trainable)
    model.to(device)
    teacher_device = device_of(teacher) if teacher is not None else None
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        drop_last=len(sampler) >= cfg.batch_size, pin_memory=device.type == "cuda")
    batches = min(len(loader), cfg.batches_per_epoch or len(loader))
    steps_per_epoch = math.ceil(batches / cfg.accum_steps)
    opt = make_optimizer(cfg, model)
    sched = _schedule(opt, cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch))
    amp_dtype, use_scaler = _amp(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    result = FitResult(cfg.epochs, world_size=world, amp=str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
                       device=str(device), trainable_params=sum(p.numel() for n, p in model.named_parameters()
                                                                if n in trainable),
                       bn_stats=cfg.bn_stats, keep=cfg.keep, val_source=val_source, holdout_images=held)
    judge = Judge(model, trainable, val_set, teacher, cfg.keep, device, rank)
    result.select_metric = judge.metric
    state_file = state_path_for(output) if output else None
    metrics_file = metrics_path_for(output) if output else None
    start = 0
    if resume and state_file and state_file.exists():
        state = _load_state(state_file, cfg)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        start, result.history = int(state["epoch"]), json.loads(state["history"])
        result.resumed_from_epoch = start
        judge.load(state.get("judge"))
        result.recalibrated_images = int(state.get("recalibrated_images", 0))
        if rank == 0 and metrics_file:
            _truncate_metrics(metrics_file, start)
    else:
        if rank == 0 and metrics_file and not resume:
            metrics_file.unlink(missing_ok=True)
        judge.start()
        if cfg.bn_stats == "recalibrate":
            sampler.set_epoch(0)
            result.recalibrated_images = recalibrate_stats(model, loader, batches, device)
    result.input_metrics = judge.input_metrics

    with _progress(progress and rank == 0) as bar:
        for epoch in range(start, cfg.epochs if stop_after is None else min(stop_after, cfg.epochs)):
            metrics = _train_epoch(net, model, teacher, loader, sampler, batches, epoch, cfg, opt, sched, scaler,
                                   amp_dtype, device, bar)
            metrics.update(judge.measure())
            judge.epoch_done(epoch + 1, metrics)
            result.history.append(metrics)
            rngs = _gather_rng(world)
            if rank == 0:
                _end_of_epoch(model, opt, sched, scaler, rngs, cfg, epoch, result, metrics, judge,
                              save_model, state_file, metrics_file)
            if world > 1:
                dist.barrier()
    if result.history:
        result.train_loss = result.history[-1]["train_loss"]
    stopped = stop_after is not None and len(result.history) < cfg.epochs
    if not stopped:  # a stopped run is continued, not judged
        result.written, result.warning = judge.finish(result.history)
    result.best_epoch = judge.best_epoch
    chosen = _written_metrics(result)
    result.val_acc, result.agreement = chosen.get("val_acc"), chosen.get("agreement")
    result.ranks_in_sync = _ranks_in_sync(model, device)
    model.cpu().eval()
    if teacher is not None:  # back where the caller keeps it (the search times and scores it on the CPU after)
        teacher.to(teacher_device)
    return result


def _written_metrics(result: FitResult) -> dict:
    """The validation metrics of the weights written (the input's, the best epoch's or the last's)."""
    if result.written == "input":
        return result.input_metrics or {}
    if result.written.startswith("best epoch"):
        return result.history[int(result.written.rsplit(" ", 1)[1]) - 1]
    return result.history[-1] if result.history else {}


def _gather_rng(world: int) -> list[dict]:
    if world <= 1:
        return [_rng_state()]
    out: list = [None] * world
    dist.all_gather_object(out, _rng_state())
    return out


def _end_of_epoch(model, opt, sched, scaler, rngs, cfg, epoch, result, metrics, judge, save_model, state_file,
                  metrics_file):
    """Rank 0: log the epoch, write the model file (the best so far: the input's, the best epoch's or this
    epoch's weights, whichever ``keep`` selects) and the state file (this epoch's weights, for resume)."""
    written = judge.written(epoch + 1)
    metrics["written"] = written
    if metrics_file:
        with metrics_file.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
    if save_model:
        # what the file's metadata should record (meta.extra["recovery"]): passed beside the epoch's metrics
        recovery = {"bn_stats": cfg.bn_stats, "keep": cfg.keep, "select_metric": judge.metric, "written": written,
                    "best_epoch": judge.best_epoch if written != "last" else epoch + 1,
                    "input": judge.input_metrics, "val_source": result.val_source,
                    "holdout_images": result.holdout_images, "recalibrated_images": result.recalibrated_images}
        best = judge.best_weights() if written != "last" else None
        if best is None:
            save_model(model, {**metrics, "recovery": recovery})
        else:  # write the best weights, then put this epoch's back to keep training
            current = judge.snapshot()
            judge.restore(best)
            try:
                chosen = dict(judge.input_metrics or {}, epoch=0) if written == "input" else \
                    result.history[judge.best_epoch - 1]
                save_model(model, {**chosen, "written": written, "recovery": recovery})
            finally:
                judge.restore(current)
    if state_file:
        state = {"version": STATE_VERSION, "epoch": epoch + 1, "model": model.state_dict(),
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                 "rng": rngs, "config": json.dumps(asdict(cfg)), "history": json.dumps(result.history),
                 "judge": judge.state(), "recalibrated_images": result.recalibrated_images}
        with atomic_path(state_file) as tmp:
            torch.save(state, tmp)


def _train_epoch(net, model, teacher, loader, sampler, batches, epoch, cfg, opt, sched, scaler, amp_dtype, device,
                 bar) -> dict:
    sampler.set_epoch(epoch)
    net.train()
    apply_bn_mode(model, cfg.bn_stats)  # freeze / recalibrate: statistics-holding norms stay in eval mode
    task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=batches, stats="")
    loss_sum = correct = labeled = seen = 0.0
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        boundary = (i + 1) % cfg.accum_steps == 0 or i + 1 == batches
        sync = nullcontext() if boundary or not hasattr(net, "no_sync") else net.no_sync()
        autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
        with sync:
            with autocast:
                t_logits = None
                if teacher is not None and cfg.objective != "ce":
                    with torch.no_grad():
                        t_logits = teacher(x).float()
                logits = net(x)
                loss = objective_loss(cfg, logits, y, t_logits)
            scaler.scale(loss / cfg.accum_steps).backward()
        if boundary:
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
        n = len(x)
        loss_sum += float(loss.detach()) * n
        seen += n
        mask = y >= 0
        labeled += int(mask.sum())
        correct += int((logits.detach().argmax(1)[mask] == y[mask]).sum())
        rate = seen / max(time.perf_counter() - t0, 1e-9)
        acc = f" acc {correct / labeled:.3f}" if labeled else ""
        bar.update(task, advance=1, stats=f"loss {loss_sum / seen:.4f}{acc} {rate:.0f} img/s")
    seconds = time.perf_counter() - t0
    loss_sum, correct, labeled, seen = _all_sum([loss_sum, correct, labeled, seen], device)
    return {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / labeled if labeled else None, "lr": opt.param_groups[0]["lr"],
            "images": int(seen), "seconds": round(seconds, 3), "images_per_s": round(seen / max(seconds, 1e-9), 1)}
