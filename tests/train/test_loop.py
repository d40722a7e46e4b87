"""The training loop end to end through the CLI: exact resume after SIGKILL, and 2-process DDP (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from helpers import ROOT, child_env
from safetensors.torch import load_file

import repconv

SHORT = ["--epochs", "3", "--batches-per-epoch", "3", "--batch-size", "32", "--train", "norm", "--lr", "3e-3",
         "--warmup-epochs", "0.5", "--accum", "2", "--seed", "7"]


def test_sigkill_and_resume_ends_identical(digits_converted, run_cli, tmp_path):
    ref, cut = tmp_path / "ref.repconv.safetensors", tmp_path / "cut.repconv.safetensors"
    done = run_cli("finetune", digits_converted, "--data", "digits", "-o", str(ref), *SHORT, "--json", child=True)
    assert done.returncode == 0, done.stderr

    proc = subprocess.Popen([sys.executable, "-m", "repconv", "finetune", digits_converted, "--data", "digits",
                             "-o", str(cut), *SHORT], env=child_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = cut.with_name(cut.name + ".state.pt")
    deadline = time.time() + 600
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # somewhere in epoch 2 (the state file appears after epoch 1)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    epochs_done = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= epochs_done < 3, "the kill did not interrupt the run"

    resumed = run_cli("finetune", digits_converted, "--data", "digits", "-o", str(cut), *SHORT, "--resume", "--json",
                      child=True)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["resumed_from_epoch"] == epochs_done and len(summary["history"]) == 3
    a, b = load_file(str(ref)), load_file(str(cut))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    lines = (cut.with_name(cut.name + ".metrics.jsonl")).read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [1, 2, 3]


def test_ddp_two_processes_gloo(digits_converted, digits_checkpoint, tmp_path):
    out = tmp_path / "ddp.repconv.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "repconv",
           "finetune", digits_converted, "--data", "digits", "--objective", "distill", "--teacher", digits_checkpoint,
           "--train", "norm", "--epochs", "1", "--batches-per-epoch", "3", "--batch-size", "16", "-o", str(out),
           "--json"]
    done = subprocess.run(cmd, env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # exactly one JSON object: only rank 0 prints
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    assert summary["history"][0]["images"] == 2 * 3 * 16  # both ranks' samples are counted
    lines = out.with_name(out.name + ".metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # only rank 0 writes
    before, after = repconv.load(digits_converted), repconv.load(out)
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert any(k.endswith("replacement.a") for k in changed) and any(".bn" in k for k in changed)
    assert summary["val_acc"] is not None and 0 <= summary["val_acc"] <= 1
