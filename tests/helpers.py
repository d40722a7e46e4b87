"""Helpers shared by the tests, imported one way: ``from helpers import ...`` (pytest's pythonpath has tests/)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

import repconv
from repconv.convert.plan import ParameterFreeStep, ReplaceStep
from repconv.data import digits
from repconv.models import resolve_arch
from repconv.search.candidates import KEEP, Candidate, UnitCandidates
from repconv.search.damage import DamageOptions
from repconv.search.run import SearchOptions
from repconv.search.table import CandidateTable, Figures
from repconv.train.local import LocalOptions

ROOT = Path(__file__).resolve().parents[1]
DIGITS_ARCH = "cifar_resnet20"
DIGITS_SIZE = 32
SMALL_CLASSES = [f"class_{i}" for i in range(10)]


class Chain(nn.Module):
    """Five repeated Linear+LayerNorm units: interior members 1..3 are replaceable."""

    def __init__(self, width: int = 8, depth: int = 5, classes: int = 3):
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU())
                                      for _ in range(depth)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine, so parity checks cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def train_digits_model(output, epochs: int = 6, seed: int = 0):
    """Train the shared digits checkpoint with repconv's own from-scratch trainer (no replacement)."""
    return repconv.train(DIGITS_ARCH, data="digits", output=output, replace=False, epochs=epochs, batch_size=64,
                         lr=0.1, optimizer="sgd", weight_decay=5e-4, warmup_epochs=1, seed=seed)


def accuracy(model: nn.Module, split: str = "val") -> float:
    """Top-1 accuracy of a digits model on a digits split (the architecture's own normalization)."""
    spec = resolve_arch(DIGITS_ARCH)
    ds = digits(split, DIGITS_SIZE, spec.mean, spec.std)
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(1) for x, in torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(ds.tensors[0]), batch_size=256)])
    return float((pred == ds.tensors[1]).float().mean())


def export_onnx_for_tests(checkpoint: str, path) -> str:
    """ONNX of a checkpoint through repconv's own export (legacy exporter: fast; verified; BN kept unfused so
    that parameter counts match the checkpoint's)."""
    repconv.export(checkpoint, path, exporter="legacy", fuse_bn=False)
    return str(path)


def quick_search_options(**kw) -> SearchOptions:
    """Search settings that run in seconds on the digits model: layer3's units, two pools, two batches a stage."""
    base = {"damage": DamageOptions(steps=2, batch_size=32), "train_images": 64, "eval_images": 64,
            "refit_images": 64, "latency_rounds": 1, "latency_block": 3, "latency_warmup": 1, "verify_rounds": 1,
            "local": LocalOptions(epochs=1, batch_size=32), "global_epochs": 1, "batches_per_epoch": 2,
            "units": ("layer3.*",), "kinds": ("pf-avg", "pf-max")}
    return SearchOptions(**(base | kw))


class CliResult(NamedTuple):
    """What a `repconv` run printed; unpacks as ``code, stdout, stderr``."""

    returncode: int
    stdout: str
    stderr: str


def child_env() -> dict:
    """Environment of a child process: this checkout first on the path, one thread (deterministic)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run_in_process(capsys, *args) -> CliResult:
    from repconv.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def run_in_child(*args, timeout: float = 600) -> CliResult:
    done = subprocess.run([sys.executable, "-m", "repconv", *map(str, args)], env=child_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    return CliResult(done.returncode, done.stdout, done.stderr)


def has_replaceable_unit(model: nn.Module) -> bool:
    """Whether any run of repeated units has an interior member: then a replacement conversion must replace one."""
    from repconv.convert.graph import find_runs

    return any(run.interior for run in find_runs(model))


class TinyBottleneckNet(nn.Module):
    """stem -> 4 bottlenecks (the 2nd downsamples) -> head: parameter-free targets and a replaceable run."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        down = nn.Sequential(nn.Conv2d(16, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.layer = nn.Sequential(Bottleneck(16, 4), Bottleneck(16, 4, stride=2, downsample=down),
                                   Bottleneck(16, 4), Bottleneck(16, 4), Bottleneck(16, 4))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.layer(self.stem(x)))


# unit -> {candidate: (latency delta ms, damage points)}
SPEC = {
    "u0": {"pf-max": (-3.0, 2.0), "pf-avg": (-2.5, 0.5)},
    "u1": {"pf-max": (-4.0, 6.0), "hybrid": (-1.0, 0.2)},
    "u2": {"pf-max": (-2.0, 1.0), "slow": (+1.0, 0.0)},
    "u3": {"pf-max": (-1.5, 3.0)},
}
BASE = 20.0


def make_table(spec=SPEC, neighbours=None) -> CandidateTable:
    units, figures = [], {}
    for unit, cands in spec.items():
        cs = [Candidate(unit, KEEP)]
        for name, (delta, damage) in cands.items():
            step = (ReplaceStep(unit, *neighbours[unit]) if name == "replace"
                    else ParameterFreeStep(f"{unit}.conv", "pool", "max"))
            c = Candidate(unit, name, [step])
            cs.append(c)
            figures[c.key] = Figures(damage=damage, latency_delta_ms=delta)
        units.append(UnitCandidates(unit, cs, {"prev": neighbours[unit][0], "next": neighbours[unit][1]}
                                    if neighbours and unit in neighbours else {}))
    return CandidateTable("k", "ort-cpu", BASE, units, figures)
