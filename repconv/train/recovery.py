"""Recovery never makes a model worse: BatchNorm statistics as a choice, agreement with the teacher, and
best-so-far selection (the weights written are the best epoch's, or the input's when training only hurt).

``bn_stats`` (what happens to the running statistics of BatchNorm-style layers while a model trains):

* ``freeze``: those layers stay in eval mode (their running statistics are used and never change); their
  affine parameters still train when the trainable set includes them. The default for recovering a
  pretrained model: re-estimating statistics on a few hundred images destroys what they hold.
* ``update``: every train-mode step updates them (PyTorch's default; training from scratch needs it).
* ``recalibrate``: reset, re-estimated once (cumulative average over one pass of the training data, no
  gradient), then frozen.

LayerNorm and GroupNorm hold no running statistics: every mode leaves them alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

# The defaults, chosen by measurement (benchmarks/bn_stats_recovery.py, docs/results.md 2.6), are
# repconv.train.recover.FINETUNE_DEFAULTS / TRAIN_DEFAULTS and CalibrateOptions.
HOLDOUT_FRACTION = 0.15  # of unlabeled training data, held out to measure agreement when there is no val set
HOLDOUT_MAX = 1000
HOLDOUT_MIN = 16  # fewer held-out images than this measure nothing: no split

_STATS = nn.modules.batchnorm._NormBase  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm (running stats)
_log = logging.getLogger("repconv.train")


# ---------------------------------------------------------------- BatchNorm statistics


def stat_norms(model: nn.Module) -> list[nn.Module]:
    """The layers whose running statistics a train-mode forward would change."""
    return [m for m in model.modules() if isinstance(m, _STATS) and m.track_running_stats]


def apply_bn_mode(model: nn.Module, bn_stats: str) -> None:
    """Call after ``model.train()``: with freeze / recalibrate, put the statistics-holding norms back in eval."""
    if bn_stats in ("freeze", "recalibrate"):
        for m in stat_norms(model):
            m.eval()


@torch.no_grad()
def recalibrate_stats(model: nn.Module, loader: DataLoader, batches: int, device: torch.device) -> int:
    """Reset every norm's running statistics and re-estimate them as a cumulative average over ``batches``
    batches of ``loader`` (no gradient; other layers such as dropout in eval mode). Under DDP each rank's
    estimate is averaged over ranks. Returns the number of images seen (this rank)."""
    norms = stat_norms(model)
    if not norms:
        return 0
    was_training = model.training
    saved = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    try:
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            model(x.to(device))
            seen += len(x)
    finally:
        for m, mom in zip(norms, saved, strict=True):
            m.momentum = mom
        model.train(was_training)
        apply_bn_mode(model, "recalibrate")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for m in norms:
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    dist.all_reduce(buf)
                    buf.div_(dist.get_world_size())
    return seen


# ---------------------------------------------------------------- agreement with the teacher


@torch.no_grad()
def predictions(model: nn.Module, dataset: Dataset, batch_size: int = 256,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 predictions, labels) over ``dataset`` in its order, model in eval mode."""
    was_training = model.training
    model.eval()
    preds, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size):
        preds.append(model(x.to(device)).argmax(1).cpu())
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(preds), torch.cat(labels)


def agreement(pred: torch.Tensor, teacher_pred: torch.Tensor) -> float:
    """Fraction of inputs on which the model's top-1 class is the teacher's."""
    return float((pred == teacher_pred).float().mean()) if len(pred) else float("nan")


def batch_agreement(model: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """Top-1 agreement on a list of input batches (both models in eval mode)."""
    was = model.training, teacher.training
    model.eval()
    teacher.eval()
    with torch.no_grad():
        same = sum(int((model(x).argmax(1) == teacher(x).argmax(1)).sum()) for x in batches)
    model.train(was[0])
    teacher.train(was[1])
    return same / max(sum(len(x) for x in batches), 1)


def holdout_split(dataset: Dataset, fraction: float = HOLDOUT_FRACTION, cap: int = HOLDOUT_MAX,
                  seed: int = 0) -> tuple[Dataset, Dataset | None]:
    """(training part, held-out part or None): a seeded random ``fraction`` of ``dataset`` (at most ``cap``
    images; none when that would be fewer than HOLDOUT_MIN images)."""
    n = len(dataset)
    k = min(round(fraction * n), cap)
    if k < HOLDOUT_MIN or n - k < 1:
        return dataset, None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(order[k:])), Subset(dataset, sorted(order[:k]))


# ---------------------------------------------------------------- best so far


def _broadcast(obj):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Judge:
    """Measures the input and every epoch on the validation data; keeps the best weights in memory.

    Only what training can change is kept (trainable parameters and buffers). Rank 0 measures and decides;
    every rank keeps the same snapshots, so every rank restores the same weights at the end.
    """

    def __init__(self, model: nn.Module, trainable: Sequence[str], val_set: Dataset | None,
                 teacher: nn.Module | None, keep: str, device: torch.device, rank: int):
        self.model, self.val_set, self.keep, self.device, self.rank = model, val_set, keep, device, rank
        names = set(trainable) | {n for n, _ in model.named_buffers()}
        self.keys = [k for k in model.state_dict() if k in names]
        self.teacher_pred = self.labels = None
        if val_set is not None and rank == 0:
            if teacher is not None:
                self.teacher_pred, self.labels = predictions(teacher, val_set, device=device)
            else:
                self.labels = torch.cat([torch.as_tensor(y) for _, y in DataLoader(val_set, batch_size=1024)])
        labeled = bool(self.labels is not None and (self.labels >= 0).any())
        has_teacher = teacher is not None and val_set is not None
        self.metric = _broadcast("val_acc" if labeled else "agreement" if has_teacher else None)
        self.active = self.metric is not None and keep != "last"
        self.input_metrics: dict | None = None
        self.input_state: dict | None = None
        self.best_epoch: int | None = None  # 0: the input
        self.best_score: float | None = None
        self.best_state: dict | None = None

    def snapshot(self) -> dict:
        state = self.model.state_dict()
        return {k: state[k].detach().to("cpu", copy=True) for k in self.keys}

    def restore(self, snap: dict) -> None:
        self.model.load_state_dict(snap, strict=False)

    def measure(self) -> dict:
        """Validation metrics of the model as it is now (rank 0; {} elsewhere or without validation data)."""
        if self.val_set is None or self.rank != 0:
            return {}
        pred, _ = predictions(self.model, self.val_set, device=self.device)
        mask = self.labels >= 0
        out = {"val_acc": float((pred[mask] == self.labels[mask]).float().mean()) if mask.any() else None}
        if self.teacher_pred is not None:
            out["agreement"] = agreement(pred, self.teacher_pred)
        return out

    def start(self) -> None:
        """Measure the input model (epoch 0) before any training."""
        self.input_metrics = _broadcast(self.measure() if self.metric else None)
        if self.active:
            self.input_state = self.snapshot()
            if self.keep == "best":
                self.best_epoch, self.best_score = 0, self.input_metrics[self.metric]

    def epoch_done(self, epoch: int, metrics: dict) -> bool:
        """Record an epoch's metrics; True when it is the best so far (its weights are then kept)."""
        # An epoch replaces the input only when strictly better; among epochs a tie goes to the later one.
        improved = _broadcast(self.active and self.rank == 0 and (
            self.best_score is None or metrics[self.metric] > self.best_score
            or (self.best_epoch != 0 and metrics[self.metric] == self.best_score)))
        if improved:
            self.best_epoch = epoch
            self.best_score = _broadcast(metrics[self.metric] if self.rank == 0 else None)
            self.best_state = self.snapshot()
        return improved

    def best_weights(self) -> dict | None:
        """The weights to write now (None: the model as it is)."""
        if not self.active or self.best_epoch is None:
            return None
        return self.input_state if self.best_epoch == 0 else self.best_state

    def written(self, last_epoch: int) -> str:
        if not self.active or self.best_epoch is None or self.best_epoch == last_epoch:
            return "last"
        return "input" if self.best_epoch == 0 else f"best epoch {self.best_epoch}"

    def state(self) -> dict:
        return {"metric": self.metric, "keep": self.keep, "input_metrics": self.input_metrics,
                "best_epoch": self.best_epoch, "best_score": self.best_score,
                "input_state": self.input_state, "best_state": self.best_state}

    def load(self, state: dict | None) -> None:
        if not state:
            return
        self.input_metrics, self.best_epoch = state["input_metrics"], state["best_epoch"]
        self.best_score, self.input_state, self.best_state = state["best_score"], state["input_state"], \
            state["best_state"]

    def finish(self, history: list[dict]) -> tuple[str, str | None]:
        """Restore the weights to write; return (written, warning or None)."""
        last = len(history)
        written = self.written(last)
        weights = self.best_weights()
        if written != "last" and weights is not None:
            self.restore(weights)
        warning = None
        if self.metric and self.input_metrics and history and self.rank == 0:
            before = self.input_metrics.get(self.metric)
            after = history[-1].get(self.metric)
            if before is not None and after is not None and after < before:
                if written == "input":
                    kept = "the input model was written unchanged"
                elif written == "last":
                    kept = f"the last epoch was written (keep={self.keep})"
                else:
                    kept = f"{written} was written ({self.metric} {self.best_score:.2%})"
                warning = (f"WARNING: recovery made the model worse: {self.metric} {before:.2%} before training, "
                           f"{after:.2%} after the last epoch; {kept}")
                _log.warning(warning)
        return written, _broadcast(warning)
