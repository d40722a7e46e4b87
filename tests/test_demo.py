"""`repconv demo --quick`: the whole pipeline, offline, end to end (what CI runs of the demo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from repconv.report import read_run


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "repconv", "demo", "--out", str(out), "--quick", "--json"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout)


def test_demo_runs_every_stage(demo_run):
    out, summary = demo_run
    run = read_run(out)
    names = [s.name for s in run.stages]
    assert names == ["original", "replacement", "replacement-calibrated", "replacement-finetuned",
                     "replacement-folded", "replacement-onnx", "replacement-onnx-int8", "pf-hybrid",
                     "pf-hybrid-finetuned", "pf-hybrid-folded", "pf-hybrid-onnx"]
    for stage in run.stages:
        if stage.name == "replacement-onnx-int8" and stage.artifact is None:
            continue
        assert stage.artifact and (out / stage.artifact).is_file(), stage.name
        assert stage.file_size == (out / stage.artifact).stat().st_size
        assert stage.val_acc is not None, stage.name
    by = {s.name: s for s in run.stages}
    assert by["original"].val_acc >= 0.9
    # replacement: fewer parameters, same MACs; fine-tuning trains a small part of the model
    assert by["replacement"].params < by["original"].params
    assert by["replacement"].macs == by["original"].macs
    assert by["replacement-finetuned"].trainable_params < by["replacement-finetuned"].params
    # folding restores the original architecture with the synthesized weights, exactly
    assert by["replacement-folded"].params == by["original"].params
    assert by["replacement-folded"].parity[0].max_rel < 1e-5
    assert by["replacement-folded"].val_acc == pytest.approx(by["replacement-finetuned"].val_acc, abs=0.003)
    # exports verified against their references; int8 agrees with fp32 on real images
    assert all(p.max_abs < 1e-3 for p in by["replacement-onnx"].parity if p.reference == "pytorch")
    int8 = by["replacement-onnx-int8"]
    if int8.artifact is None:  # refused by its verification: the run must say so, loudly
        assert "failed verification" in int8.notes[0] and any("replacement-onnx-int8" in n for n in run.notes)
    else:
        agreement = [p.top1_agreement for p in int8.parity if p.top1_agreement is not None]
        assert agreement and agreement[0] >= 0.98
    assert by["replacement-onnx"].val_acc == pytest.approx(by["replacement-folded"].val_acc, abs=0.003)
    # parameter-free hybrid: fewer parameters and MACs than the original
    assert by["pf-hybrid"].params < by["original"].params and by["pf-hybrid"].macs < by["original"].macs
    assert {r.method for r in run.plan} == {"replacement", "parameter-free"}
    assert all(set(r.scalars) == {"a", "b"} for r in run.plan if r.method == "replacement")
    assert Path(summary["report"]).is_file() and summary["run"] == str(out / "run.json")


def test_demo_reuses_a_trained_model(tmp_path, digits_checkpoint):
    from repconv.demo import FULL, _original, _Steps
    from repconv.report import RunRecord

    target = tmp_path / "original.repconv.safetensors"
    shutil.copy(digits_checkpoint, target)
    before = target.stat().st_mtime_ns
    run = RunRecord()
    assert _original(run, tmp_path, FULL, _Steps(1, lambda _m: None), progress=False) == target
    stage = run.stage("original")
    assert "reused" in stage.notes[0] and stage.val_acc >= 0.95 and stage.params == stage.trainable_params
    assert target.stat().st_mtime_ns == before


def test_demo_refuses_another_arch_in_out(tmp_path):
    from repconv.checkpoint import CheckpointMeta, save
    from repconv.demo import FULL, _original, _Steps
    from repconv.errors import InputFileError
    from repconv.models import resolve_arch
    from repconv.report import RunRecord

    save(tmp_path / "original.repconv.safetensors", resolve_arch("cifar_resnet8").build(),
         CheckpointMeta.for_arch(resolve_arch("cifar_resnet8")))
    with pytest.raises(InputFileError, match="cifar_resnet8, not the demo's cifar_resnet20"):
        _original(RunRecord(), tmp_path, FULL, _Steps(1, lambda _m: None), progress=False)


def test_demo_bad_output(tmp_path, run_cli):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli("demo", "--out", blocker / "sub", "--quick")
    assert code == 2 and "cannot create the output folder" in err and len(err.strip().splitlines()) == 1
