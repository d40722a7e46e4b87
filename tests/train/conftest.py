"""Fixtures of the recover-and-train area: the digits model converted (and calibrated) once per session."""

from __future__ import annotations

import pytest

import repconv


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
