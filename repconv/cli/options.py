"""The options several commands share, as typer annotations (one definition each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from repconv.errors import OptionError
from repconv.options import Amp, Backend, BnStatsChoice, Device, Keep

ModelArg = Annotated[Path, typer.Argument(help="checkpoint: a state_dict (.pt/.pth/.bin), .safetensors or a "
                                          "repconv file (recognised by content)")]
ArchOpt = Annotated[str | None, typer.Option("--arch", help="architecture when the file holds only weights "
                                             "(repconv, torchvision or timm name; prefix torchvision: or timm:)")]
NumClassesOpt = Annotated[int | None, typer.Option("--num-classes", help="default: what the classifier "
                                                   "weights in the file say")]
TrustOpt = Annotated[bool, typer.Option("--trust-pickle", help="allow loading a pickled nn.Module "
                                        "(runs code from the file: only for files you trust)")]
LeafOpt = Annotated[list[str] | None, typer.Option("--leaf", help="module path to keep opaque (not traced "
                                                   "into, not rewritten); repeatable")]
RemapOpt = Annotated[str | None, typer.Option("--remap", help="map a foreign checkpoint's keys onto --arch: "
                                              "position (in order, shapes checked)")]
RemapRulesOpt = Annotated[str | None, typer.Option("--remap-rules", help="map a foreign checkpoint's keys with a "
                                                   "rules file (JSON/TOML), or a shipped one by name "
                                                   "(efficientnet_lite0)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout instead of tables")]
OutOpt = Annotated[Path, typer.Option("-o", "--output", help="output file (*.repconv.safetensors)")]

# ---- data and training
DataOpt = Annotated[str, typer.Option("--data", help="'digits' (bundled, no download), an ImageFolder tree "
                                      "(ROOT/CLASS/*.jpg; ROOT/train and ROOT/val when present) or a folder of "
                                      "unlabeled images (distillation)")]
ValDataOpt = Annotated[str | None, typer.Option("--val-data", help="labeled validation images (default: the "
                                                "data's own val split when it has one)")]
TeacherOpt = Annotated[Path | None, typer.Option("--teacher", help="the original checkpoint (any file repconv "
                                                 "loads)")]
TeacherArchOpt = Annotated[str | None, typer.Option("--teacher-arch", help="the teacher's architecture when its "
                                                   "file holds only weights (default: the one the model was "
                                                   "converted from)")]
SizeOpt = Annotated[int | None, typer.Option("--input-size", help="square input size (default: the model's)")]
MeanOpt = Annotated[tuple[float, float, float] | None, typer.Option("--mean", help="normalization mean, three "
                                                                    "values (default: the model's)")]
StdOpt = Annotated[tuple[float, float, float] | None, typer.Option("--std", help="normalization std, three "
                                                                   "values (default: the model's)")]
EpochsOpt = Annotated[int, typer.Option("--epochs")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="per process")]
SeedOpt = Annotated[int, typer.Option("--seed")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue from OUTPUT.state.pt (epoch boundary)")]
BatchesOpt = Annotated[int | None, typer.Option("--batches-per-epoch", help="cap the batches of an epoch")]
AccumOpt = Annotated[int, typer.Option("--accum", help="gradient accumulation steps")]
AmpOpt = Annotated[Amp, typer.Option("--amp", help="auto (fp16/bf16 on CUDA, off on CPU) | on | off")]
WarmupOpt = Annotated[float, typer.Option("--warmup-epochs", help="linear warmup, then cosine decay")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="DataLoader worker processes")]
BnStatsOpt = Annotated[BnStatsChoice, typer.Option("--bn-stats", help="BatchNorm running statistics: freeze "
                                                   "(kept; affine still trains) | update (every step) | recalibrate "
                                                   "(re-estimated once, then frozen) | auto (freeze, or update for "
                                                   "parameter-free conversions)")]
KeepOpt = Annotated[Keep, typer.Option("--keep", help="weights written: best (best epoch, or the input when no "
                                       "epoch beats it) | best_epoch | last")]
HoldoutOpt = Annotated[float, typer.Option("--holdout", help="without --val-data, this fraction of the images is "
                                           "held out to measure agreement with the teacher (0: none)")]
LrOpt = Annotated[float, typer.Option("--lr")]
WeightDecayOpt = Annotated[float, typer.Option("--weight-decay")]

# ---- running artifacts
BackendOpt = Annotated[Backend | None, typer.Option("--backend", help="torch | ort | trt (default: what the file "
                                                    "is)")]
DeviceOpt = Annotated[Device | None, typer.Option("--device", help="cpu | cuda (default: cuda when available)")]


def parse_ints(text: str, name: str, example: str) -> tuple[int, ...]:
    """``"1,8,32"`` -> (1, 8, 32), repeats dropped; anything else is an OptionError naming ``name``."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise OptionError(name, text, "does not parse as a list of positive integers", f"write it like {example}")
    return tuple(dict.fromkeys(values))
