"""Where recovery starts, chosen by measurement: a race of a few epochs between candidate starts.

A step that lowers a converted model's error before training (the least-squares refit, block-wise distillation)
can still leave a worse model after training: on a converged resnet50 at 32px the refit lifts pf-all from 9% to
49% before distillation and ends 1.4 points below plain distillation, while on mobilenet_v2 it is worth 7 points
(docs/results.md 2.7a, 2.7d). After the first epoch of distillation the order of the starts was already the
order at the end in three of the four cases measured, and the fourth ended one image apart (2.7f). So each
start trains the first ``epochs`` of the SAME schedule (``loop.fit(stop_after=...)``), and the one that then
scores best on the held-out images (the training loop's judge: accuracy where they have labels, else top-1
agreement with the teacher) continues where it stopped: its optimizer and schedule state carry on, so only the
losers' epochs are extra work. Ties go to the start listed first.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from repconv.errors import OptionError
from repconv.train.loop import TrainConfig, fit, metrics_path_for, state_path_for


@dataclass
class RaceResult:
    chosen: str
    scores: dict[str, float | None]  # the judge's metric of each start after the race epochs
    metric: str | None  # "agreement" (with the teacher, held-out images) or "val_acc" (labels)
    epochs: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def race_output(output: str | os.PathLike, name: str) -> Path:
    """Where start ``name`` keeps its state while it races for ``output``."""
    return Path(f"{output}.start-{name}")


def _discard(output: Path) -> None:
    for path in (state_path_for(output), metrics_path_for(output)):
        path.unlink(missing_ok=True)


def race(starts: Mapping[str, nn.Module], train_set: Dataset, cfg: TrainConfig, *, teacher: nn.Module | None,
         output: str | os.PathLike, epochs: int = 1, val_set: Dataset | None = None,
         progress: bool = False, say: Callable[[str], None] | None = None) -> tuple[nn.Module, RaceResult]:
    """Train each of ``starts`` (name -> model; the models are trained in place) for the first ``epochs`` of
    ``cfg``'s schedule and keep the one the judge scores best. Returns (that model, the race). Its state and
    metrics files become ``output``'s, so ``fit(model, ..., cfg, output=output, resume=True)`` continues it.
    Without a metric to judge by (no teacher and no labels) the first start wins. ``say(text)`` hears which start
    is training."""
    if not starts:
        raise OptionError("starts", starts, "is empty", "give at least one model to start from")
    if epochs < 1:
        raise OptionError("race_epochs", epochs, "must be at least 1", "give the epochs each start trains, e.g. 1")
    names = list(starts)
    if len(names) == 1:
        return starts[names[0]], RaceResult(names[0], {names[0]: None}, None, 0, 0.0)
    started = time.perf_counter()
    scores: dict[str, float | None] = {}
    metric = None
    for i, name in enumerate(names, 1):
        arm = race_output(output, name)
        _discard(arm)
        if say:
            say(f"race {i}/{len(names)}: the first {epochs} epoch(s) from the {name} model")
        res = fit(starts[name], train_set, copy.deepcopy(cfg), val_set=val_set, teacher=teacher, output=arm,
                  progress=progress, stop_after=epochs)
        metric = res.select_metric
        scores[name] = res.history[-1].get(metric) if metric and res.history else None
    if metric is None or any(v is None for v in scores.values()):
        chosen = names[0]
    else:
        chosen = max(names, key=lambda n: (scores[n], -names.index(n)))
    for name in names:
        arm = race_output(output, name)
        if name == chosen:
            os.replace(state_path_for(arm), state_path_for(output))
            if metrics_path_for(arm).exists():
                os.replace(metrics_path_for(arm), metrics_path_for(output))
        _discard(arm)
    return starts[chosen], RaceResult(chosen, scores, metric, min(epochs, cfg.epochs),
                                      round(time.perf_counter() - started, 1))
