"""benchmarks/bn_stats_recovery.py --quick runs end to end (CI smoke run, about 30-60 s on 2 cores).

(Belongs with tests/test_benchmarks_quick.py; kept here while that file is being restructured.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bn_stats_recovery_quick(tmp_path):
    out = tmp_path / "bn_stats_recovery.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bn_stats_recovery.py"), "--quick",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["config"]["quick"] is True and r["machine"]["loadavg_1m_at_start"] >= 0
    run = r["runs"][0]
    assert run["teacher_lr0"]["freeze"]["agreement"] == 1.0  # the default leaves a model alone at lr 0
    assert set(run["calibrated"]) == {"freeze", "recalibrate"} and len(run["finetuned"]) == 8
    for arm in run["finetuned"].values():
        assert 0 <= arm["agreement"] <= 1 and arm["written"]
    assert isinstance(r["summary"]["defaults_never_below_calibrate"], bool)
