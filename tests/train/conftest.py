"""Fixtures of the recover-and-train area: the digits model converted (and calibrated) once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import repconv

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def digits_converted(digits_checkpoint, tmp_path_factory) -> str:
    """The digits model in Replacement Learning form, scalars at their 'half' init (0.5, 0.5)."""
    path = tmp_path_factory.mktemp("converted") / "digits_rl.repconv.safetensors"
    repconv.convert(digits_checkpoint, init="half", output=path)
    return str(path)


@pytest.fixture(scope="session")
def digits_calibrated(digits_converted, digits_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("calibrated") / "digits_cal.repconv.safetensors"
    result = repconv.calibrate(digits_converted, teacher=digits_checkpoint, data="digits", output=path)
    return str(path), result


@pytest.fixture(scope="session")
def cli_env() -> dict:
    """Environment of a child process: one thread (deterministic, and kind to a shared machine)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def run_cli(cli_env):
    """`python -m repconv ARGS` in a fresh process."""
    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "repconv", *args], env=cli_env, capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT)
    return run
