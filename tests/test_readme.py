"""The README's usage block, run exactly as written, on a plain torch.save(state_dict) of torchvision's resnet50
and a tiny ImageFolder made from digits: what a new user does on the first day."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
import torchvision
from helpers import ROOT
from PIL import Image

import repconv
from repconv.data import digits_images


def readme_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Use\n.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("repconv ")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), folder / "resnet50.pt")
    x, y = digits_images("val")
    for i in range(20):  # two per class, 32 px
        path = folder / "photos" / str(int(y[i])) / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i, 0].numpy() * 255).astype("uint8")).resize((32, 32)).convert("RGB").save(path)
    return folder


def test_readme_usage_block_runs_as_written(workdir):
    lines = readme_lines()
    assert len(lines) >= 10 and lines[0].startswith("repconv inspect resnet50.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    old = os.umask(0o022)
    try:
        for line in lines:
            command = f"{shlex.quote(sys.executable)} -m {line}"
            done = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True,
                                  timeout=900)
            assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
    finally:
        os.umask(old)
    folded = torchvision.models.resnet50()
    folded.load_state_dict(repconv.load(workdir / "r50.folded.safetensors").state_dict(), strict=True)
    written = ["r50.repconv.safetensors", "r50.cal.repconv.safetensors", "r50.ft.repconv.safetensors",
               "r50.folded.safetensors", "r50.onnx", "bench.json", "bench.png", "c56.pt"]
    for name in written:  # the mode a plain write gives under umask 022, safetensors included
        assert (workdir / name).stat().st_mode & 0o777 == 0o644, name
    assert repconv.load_checkpoint(workdir / "c56.pt").meta.arch == "repconv:cifar_resnet56"  # by content
    assert not list(workdir.glob(".*.part"))
