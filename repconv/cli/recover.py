"""`repconv calibrate`, `finetune` and `train`."""

from __future__ import annotations

from typing import Annotated

import typer

from repconv.cli import render
from repconv.cli.options import (
    AccumOpt,
    AmpOpt,
    BatchesOpt,
    BatchSizeOpt,
    BnStatsOpt,
    DataOpt,
    EpochsOpt,
    HoldoutOpt,
    JsonOpt,
    KeepOpt,
    LrOpt,
    MeanOpt,
    ModelArg,
    OutOpt,
    ResumeOpt,
    SeedOpt,
    SizeOpt,
    StdOpt,
    TeacherArchOpt,
    TeacherOpt,
    TrustOpt,
    ValDataOpt,
    WarmupOpt,
    WeightDecayOpt,
    WorkersOpt,
)
from repconv.formatting import human
from repconv.options import BnStats, CalibrateSelect, Objective, Optimizer, Trainable

ObjectiveOpt = Annotated[Objective, typer.Option("--objective", help="ce (labels) | distill (KL to the teacher; "
                                                 "unlabeled data works) | both")]
TrainOpt = Annotated[Trainable, typer.Option("--train", help="auto (scalars; all for a parameter-free conversion) | "
                                             "scalars | norm (scalars + norm affine + classifier) | all")]


def _config(values: dict):
    from repconv.api import TrainConfig
    from repconv.options import from_values

    return from_values(TrainConfig, {**values, "trainable": values.get("train", "all")})


def calibrate(model: ModelArg, data: DataOpt, output: OutOpt, teacher: TeacherOpt = None,
              teacher_arch: TeacherArchOpt = None, val_data: ValDataOpt = None,
              batches: Annotated[int, typer.Option("--batches", help="calibration batches")] = 4,
              batch_size: BatchSizeOpt = 32,
              select: Annotated[CalibrateSelect, typer.Option("--select", help="all: fit every replaced unit | "
                                                              "measured: keep only the --budget least harmful ones "
                                                              "(KL of logits)")] = "all",
              budget: Annotated[int | None, typer.Option("--budget", help="units to keep with --select "
                                                         "measured")] = None,
              max_iter: Annotated[int, typer.Option("--max-iter", help="L-BFGS iterations")] = 20,
              bn_stats: Annotated[BnStats, typer.Option("--bn-stats", help="the replaced units' BatchNorm "
                                                        "statistics: recalibrate (re-estimated on the calibration "
                                                        "images) | freeze (the original unit's) | update")]
              = "recalibrate",
              heldout_batches: Annotated[int, typer.Option("--heldout-batches", help="batches held out from the "
                                                           "fit to measure agreement with the teacher")] = 4,
              input_size: SizeOpt = None, mean: MeanOpt = None, std: StdOpt = None, seed: SeedOpt = 0,
              trust_pickle: TrustOpt = False, as_json: JsonOpt = False) -> None:
    """Fit each replaced unit's scalars (a, b), and refit the layer after each parameter-free pool, to the
    original model on a few batches."""
    from repconv import api
    from repconv.options import from_values

    r = api.calibrate(model, teacher=teacher, teacher_arch=teacher_arch, data=data, output=output,
                      val_data=val_data, input_size=input_size,
                      mean=mean, std=std, trust_pickle=trust_pickle, progress=None if as_json else render.note,
                      options=from_values(api.CalibrateOptions, locals()))
    for note in r.notes:
        render.warn(note)
    if as_json:
        render.emit_json(r.to_dict())
    else:
        render.calibration(r)


def finetune(model: ModelArg, data: DataOpt, output: OutOpt, teacher: TeacherOpt = None,
             teacher_arch: TeacherArchOpt = None, objective: ObjectiveOpt = "ce", train: TrainOpt = "auto",
             val_data: ValDataOpt = None,
             epochs: EpochsOpt = 3, batch_size: BatchSizeOpt = 64, lr: LrOpt = 1e-3,
             optimizer: Annotated[Optimizer, typer.Option("--optimizer", help="adamw | sgd")] = "adamw",
             weight_decay: WeightDecayOpt = 1e-4, warmup_epochs: WarmupOpt = 0.0, accum_steps: AccumOpt = 1,
             temperature: Annotated[float, typer.Option("--temperature", help="distillation temperature")] = 2.0,
             alpha: Annotated[float, typer.Option("--alpha", help="label-loss weight in 'both'")] = 0.5,
             amp: AmpOpt = "auto", seed: SeedOpt = 0, workers: WorkersOpt = 0, batches_per_epoch: BatchesOpt = None,
             bn_stats: BnStatsOpt = "auto", keep: KeepOpt = "best", holdout: HoldoutOpt = 0.15,
             local_epochs: Annotated[int, typer.Option("--local-epochs", help="block-wise (local) distillation "
                                                       "from --teacher before fine-tuning: each converted unit "
                                                       "learns the original unit's output; 0 (the default) skips "
                                                       "it")] = 0,
             input_size: SizeOpt = None, mean: MeanOpt = None, std: StdOpt = None, resume: ResumeOpt = False,
             trust_pickle: TrustOpt = False, as_json: JsonOpt = False) -> None:
    """Recover a converted model with labels, distillation from the original, or both (torchrun-ready)."""
    from repconv import api

    r = api.finetune(model, data=data, output=output, teacher=teacher, teacher_arch=teacher_arch,
                     val_data=val_data, input_size=input_size,
                     mean=mean, std=std, resume=resume, progress=not as_json, trust_pickle=trust_pickle,
                     config=_config(locals()),
                     local=api.LocalOptions(epochs=local_epochs, batch_size=batch_size, seed=seed))
    if r.rank != 0:
        return
    for note in r.notes:
        render.warn(note)
    if r.warning:
        render.warn(r.warning)
    if as_json:
        render.emit_json(r.to_dict())
        return
    render.written(r)
    if r.local:
        render.note(f"local distillation of {len(r.local['units'])} units, {r.local['epochs']} epoch(s): mean "
                    f"relative unit error {r.local['mean_error_before']:.3f} -> {r.local['mean_error_after']:.3f}")
    render.history(r.history, f"finetune --objective {r.objective} --train {r.train}: "
                   f"{human(r.trainable_params)} of {human(r.total_params)} parameters trained -> {r.output}")
    if r.resumed_from_epoch is not None:
        render.note(f"resumed after epoch {r.resumed_from_epoch}")


def train(arch: Annotated[str, typer.Argument(help="architecture name (e.g. cifar_resnet56, resnet18)")],
          data: DataOpt, output: OutOpt,
          replace_every: Annotated[int, typer.Option("--replace-every", help="replace every K-th interior unit "
                                                     "of each run (K >= 2)")] = 2,
          no_replace: Annotated[bool, typer.Option("--no-replace", help="ordinary end-to-end training")] = False,
          val_data: ValDataOpt = None, epochs: EpochsOpt = 30, batch_size: BatchSizeOpt = 64, lr: LrOpt = 0.1,
          optimizer: Annotated[Optimizer, typer.Option("--optimizer", help="sgd | adamw")] = "sgd",
          weight_decay: WeightDecayOpt = 5e-4, warmup_epochs: WarmupOpt = 1.0, accum_steps: AccumOpt = 1,
          label_smoothing: Annotated[float, typer.Option("--label-smoothing")] = 0.0,
          amp: AmpOpt = "auto", seed: SeedOpt = 0, workers: WorkersOpt = 0, batches_per_epoch: BatchesOpt = None,
          bn_stats: BnStatsOpt = "update", keep: KeepOpt = "last",
          input_size: SizeOpt = None, mean: MeanOpt = None, std: StdOpt = None, resume: ResumeOpt = False,
          as_json: JsonOpt = False) -> None:
    """Train from scratch, with Replacement Learning (the papers' setting) or without."""
    from repconv import api

    r = api.train(arch, data=data, output=output, replace=not no_replace, replace_every=replace_every,
                  val_data=val_data, input_size=input_size, mean=mean, std=std, resume=resume,
                  progress=not as_json, config=_config(locals()))
    if r.rank != 0:
        return
    if as_json:
        render.emit_json(r.to_dict())
        return
    units = f"{len(r.replaced_units)} replaced units" if r.replaced_units else "no replaced unit"
    render.history(r.history, f"train {r.arch} ({units}; {human(r.trainable_params)} trainable of "
                   f"{human(r.params)}) -> {r.output}")
