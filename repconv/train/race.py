"""Where recovery starts, chosen by measurement: a race between candidate starts over rungs of one schedule.

A step that lowers a converted model's error before training (the least-squares refit, block-wise distillation)
can still leave a worse model after training: on a converged resnet50 at 32px the refit lifts pf-all from 9% to
49% before distillation and ends 1.4 points below plain distillation, while on mobilenet_v2 it is worth 7 points
(docs/results.md 2.7a, 2.7d). And the search's plans (``repconv.search.rivals``) differ in ways its table does not
see. So the starts train the first epochs of the SAME schedule (``loop.fit(stop_after=...)``, resumed from rung
to rung) and the training loop's judge scores them on the held-out images (accuracy where they have labels,
else top-1 agreement with the teacher). With one rung, the default ``epochs=1``, the best after it continues;
with several, the race is successive halving (Jamieson & Talwalkar, 2016): the better half of the field (rounded
up) go on to the next rung, and the best at the last rung it needs continues. The winner carries on where it
stopped, optimizer and schedule state included, so only the losers' epochs are extra. Ties go to the start
listed first; two starts race one rung whatever the rungs, as the half of two is one.

Measured (2.7f, 2.7k): between a start and its refit the order after epoch 1 was the end order in three of four
cases (the fourth ended one image apart); between five resnet50 plans, over three seeds, the epoch-1 judge kept
plans 0.37 points below the best on average, as well as judging at the end did, and halving over (1, 3) 1.11:
the middle epochs are the noisiest.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from repconv.errors import OptionError
from repconv.train.loop import TrainConfig, fit, metrics_path_for, state_path_for

Rungs = int | Sequence[int]


@dataclass
class RaceResult:
    chosen: str
    scores: dict[str, float | None]  # the judge's metric of each start at the last rung it reached
    metric: str | None  # "agreement" (with the teacher, held-out images) or "val_acc" (labels)
    epochs: int  # the epochs the chosen start trained in the race
    seconds: float
    rounds: list[dict] = field(default_factory=list)  # per rung: {"epochs": n, "scores": {start: metric}}

    def to_dict(self) -> dict:
        return asdict(self)


def check_rungs(epochs: Rungs) -> tuple[int, ...]:
    """``epochs`` as rungs: an int n is (n,); rungs must be increasing and at least 1."""
    rungs = (epochs,) if isinstance(epochs, int) else tuple(epochs)
    if not rungs or rungs[0] < 1 or any(b <= a for a, b in itertools.pairwise(rungs)):
        raise OptionError("race_epochs", rungs[0] if len(rungs) == 1 else ",".join(map(str, rungs)),
                          "must be at least 1 and increasing", "give the epochs of each rung, e.g. 1 or 1,3")
    return rungs


def survivors(scores: Mapping[str, float], order: Sequence[str], *, last: bool) -> list[str]:
    """The starts of ``scores`` (name -> the judge's metric at a rung) that go on: the better half, rounded up, or
    the best alone at the ``last`` rung. Ties go to the start earlier in ``order``."""
    ranked = sorted(scores, key=lambda n: (-scores[n], order.index(n)))
    return ranked[:1 if last else math.ceil(len(ranked) / 2)]


def race_output(output: str | os.PathLike, name: str) -> Path:
    """Where start ``name`` keeps its state while it races for ``output``."""
    return Path(f"{output}.start-{name}")


def _discard(output: Path) -> None:
    for path in (state_path_for(output), metrics_path_for(output)):
        path.unlink(missing_ok=True)


def race(starts: Mapping[str, nn.Module], train_set: Dataset, cfg: TrainConfig, *, teacher: nn.Module | None,
         output: str | os.PathLike, epochs: Rungs = 1, val_set: Dataset | None = None,
         progress: bool = False, say: Callable[[str], None] | None = None) -> tuple[nn.Module, RaceResult]:
    """Race ``starts`` (name -> model; the models are trained in place) over the rungs ``epochs`` of ``cfg``'s
    schedule (capped at its length), halving the field at each rung, and keep the one the judge scores best.
    Returns (that model, the race). Its state and metrics files become ``output``'s, so ``fit(model, ..., cfg,
    output=output, resume=True)`` continues it. Without a metric to judge by (no teacher and no labels) the first
    start wins. ``say(text)`` hears which start is training."""
    if not starts:
        raise OptionError("starts", starts, "is empty", "give at least one model to start from")
    rungs = sorted({min(r, cfg.epochs) for r in check_rungs(epochs)})
    names = list(starts)
    if len(names) == 1:
        return starts[names[0]], RaceResult(names[0], {names[0]: None}, None, 0, 0.0)
    started = time.perf_counter()
    scores: dict[str, float | None] = {}
    rounds: list[dict] = []
    alive, metric = names, None
    for r, rung in enumerate(rungs):
        for i, name in enumerate(alive, 1):
            arm = race_output(output, name)
            if r == 0:
                _discard(arm)
            if say:
                say(f"race to epoch {rung}, {i}/{len(alive)}: the {name} model")
            res = fit(starts[name], train_set, copy.deepcopy(cfg), val_set=val_set, teacher=teacher, output=arm,
                      progress=progress, stop_after=rung, resume=r > 0)
            metric = res.select_metric
            scores[name] = res.history[-1].get(metric) if metric and res.history else None
        at_rung = {n: scores[n] for n in alive}
        rounds.append({"epochs": rung, "scores": at_rung})
        if metric is None or None in at_rung.values():
            alive = alive[:1]  # nothing to judge by: the first start
        else:
            alive = survivors(at_rung, names, last=r == len(rungs) - 1)
        if len(alive) == 1:
            break
    chosen = alive[0]
    for name in names:
        arm = race_output(output, name)
        if name == chosen:
            os.replace(state_path_for(arm), state_path_for(output))
            if metrics_path_for(arm).exists():
                os.replace(metrics_path_for(arm), metrics_path_for(output))
        _discard(arm)
    return starts[chosen], RaceResult(chosen, scores, metric, rounds[-1]["epochs"],
                                      round(time.perf_counter() - started, 1), rounds)
