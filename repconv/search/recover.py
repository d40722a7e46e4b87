"""The recovery of a converted model, as ``search`` runs it (and as its benchmark runs the uniform policies):

1. the least-squares refit of the layer after each new pool (``refit``): ``on``, ``off``, or ``auto``, where
   the refitted model and the converted one race through the first epoch(s) of the global stage
   (:mod:`repconv.train.race`) and the better continues; with a local stage ``auto`` refits (the race needs the
   global stage to follow the start directly);
2. block-wise (local) distillation (``local.epochs``; 0, the default, skips it: it lost to spending the same
   epochs on the global stage in every measurement, docs/results.md 2.7b and 2.7f);
3. the global stage: logits distillation from the original, every weight, keeping the best epoch by agreement
   on a hold-out of the training images (or the input: never worse than its start).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from repconv.search.data import batches_on, image_list
from repconv.train.calibrate import refit_layers
from repconv.train.local import LocalResult, local_distill
from repconv.train.loop import TrainConfig, fit, metrics_path_for, state_path_for
from repconv.train.race import race
from repconv.train.refit import has_pools

if TYPE_CHECKING:
    from repconv.search.run import SearchOptions


@dataclass
class Starts:
    """What the global stage may start from (name -> model, in race order), and how they were made."""

    models: dict[str, nn.Module]
    refit: dict | None = None  # the refit's errors and KL check (None: not run)
    local: LocalResult | None = None
    local_skipped: bool = False
    seconds: dict = field(default_factory=dict)


def refit_mode(options: SearchOptions, plan) -> str:
    """The refit as it will run for ``plan``: off without pools; on where ``auto`` cannot race (a local stage,
    or no global stage after it)."""
    if options.refit == "off" or not has_pools(plan):
        return "off"
    if options.refit == "auto" and (not options.skip_local or options.global_epochs == 0):
        return "on"
    return options.refit


def prepare_starts(student: nn.Module, teacher: nn.Module, train_set, plan, options: SearchOptions,
                   eval_batches: Sequence[torch.Tensor], *, say: Callable[[str], None] = lambda _m: None,
                   progress: bool = False) -> Starts:
    """The refit and the local stage of ``student`` (converted with ``plan``, on ``teacher``'s device)."""
    mode = refit_mode(options, plan)
    starts = Starts({"converted": student}, local_skipped=options.skip_local)
    if mode != "off":
        say("refitting the layers after the new pools (least squares)")
        refitted = copy.deepcopy(student) if mode == "auto" else student
        cal = refit_layers(refitted, teacher, batches_on(teacher, image_list(train_set, options.refit_images, 64)))
        starts.refit = cal.refit | {"kept_input": cal.kept_input, "kl_before": cal.kl_before,
                                    "kl_after": cal.kl_after, "mode": mode}
        if mode == "on":
            starts.models = {"refit": refitted}
        elif not cal.kept_input:  # a refit its own KL check undid is the converted model: nothing to race
            starts.models = {"converted": student, "refit": refitted}
    if options.skip_local:
        say("local distillation skipped (0 local epochs)")
        return starts
    t0 = time.perf_counter()
    (model,) = starts.models.values()  # a local stage never races (refit_mode)
    local_opts = copy.deepcopy(options.local)
    if options.batches_per_epoch:
        local_opts.steps_per_epoch = options.batches_per_epoch
    starts.local = local_distill(model, teacher, train_set, plan=plan, options=local_opts, eval_data=list(eval_batches)
                                 or None, progress=progress)
    starts.seconds["local"] = round(time.perf_counter() - t0, 1)
    return starts


def global_config(options: SearchOptions) -> TrainConfig:
    """The global stage: logits distillation, every weight, the best epoch (or the input) kept."""
    return TrainConfig(epochs=options.global_epochs, lr=options.global_lr, objective=options.global_objective,
                       trainable="all", batch_size=options.local.batch_size, seed=options.seed,
                       batches_per_epoch=options.batches_per_epoch, keep="best")  # never worse than its input


@dataclass
class GlobalStage:
    model: nn.Module
    history: list[dict]
    start: dict | None  # race.RaceResult of the starts (None: one start, nothing raced)
    seconds: float


def global_stage(starts: dict[str, nn.Module], teacher: nn.Module, train_set, options: SearchOptions, *,
                 output: str | os.PathLike, save_model: Callable[[nn.Module, dict], None] | None = None,
                 on_start: Callable[[dict], None] | None = None, resume: bool = False,
                 progress: bool = False, say: Callable[[str], None] | None = None) -> GlobalStage:
    """Race ``starts`` when there are several (``on_start(race)`` hears the result before training goes on),
    then train the winner to the end of the schedule; ``output``'s state file lets ``resume`` continue (a resumed
    stage that has one continues it and races nothing)."""
    t0 = time.perf_counter()
    cfg = global_config(options)
    model, start = next(iter(starts.values())), None
    continuing = resume and state_path_for(output).exists()
    if len(starts) > 1 and not continuing:
        model, raced = race(starts, train_set, cfg, teacher=teacher, output=output, epochs=options.race_epochs,
                            progress=progress, say=say)
        start = raced.to_dict()
        if on_start:
            on_start(start)
        continuing = True
    res = fit(model, train_set, cfg, teacher=teacher, save_model=save_model, output=output, resume=continuing,
              progress=progress)
    return GlobalStage(model, res.history, start, round(time.perf_counter() - t0, 1))


def recover(student: nn.Module, teacher: nn.Module, train_set, plan, options: SearchOptions, *,
            output: str | os.PathLike, eval_batches: Sequence[torch.Tensor] = ()) -> tuple[nn.Module, dict]:
    """The whole recovery of a converted ``student`` (for benchmarks of uniform policies: no checkpoint is written
    besides the global stage's state files beside ``output``, removed at the end). Returns (the recovered model on
    the CPU, what each stage did)."""
    starts = prepare_starts(student, teacher, train_set, plan, options, eval_batches)
    model, info = next(iter(starts.models.values())), {"refit": starts.refit, "local_skipped": starts.local_skipped}
    if options.global_epochs > 0:
        stage = global_stage(starts.models, teacher, train_set, options, output=output)
        model, info["start"], info["history"] = stage.model, stage.start, stage.history
        state_path_for(output).unlink(missing_ok=True)
        metrics_path_for(output).unlink(missing_ok=True)
    return model.cpu().eval(), info
