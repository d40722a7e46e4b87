"""ort_session, the one ONNX Runtime session builder: the device's providers by default, or the execution
providers a caller names (the search's latency targets), each checked against this onnxruntime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from repconv.errors import DependencyError, InputFileError, OptionError
from repconv.onnx_graph import ort_providers, ort_session, run_onnx


def test_the_device_decides_the_providers_by_default(small_onnx):
    session = ort_session(small_onnx)
    assert session.get_providers() == ["CPUExecutionProvider"] == ort_providers("cpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(DependencyError, match="no CUDA provider"):
            ort_session(small_onnx, device="cuda")


def test_named_providers(small_onnx):
    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    session = ort_session(small_onnx, "all", threads=1, spinning="on", providers=["CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session.get_session_options().intra_op_num_threads == 1
    assert np.abs(run_onnx(session, x) - run_onnx(ort_session(small_onnx), x)).max() <= 1e-5


def test_spinning_within_runs_only(small_onnx):
    """Sessions timed in turn spin within each run and stop when it returns; the default spins not at all; bench's
    sessions keep ONNX Runtime's defaults (neither entry set)."""
    def entry(session, key: str) -> str | None:
        try:
            return session.get_session_options().get_session_config_entry(key)
        except RuntimeError:  # "SessionOptions does not have configuration with key: ..."
            return None

    keys = ("session.intra_op.allow_spinning", "session.force_spinning_stop")
    assert [entry(ort_session(small_onnx), k) for k in keys] == ["0", None]
    assert [entry(ort_session(small_onnx, spinning="in-runs"), k) for k in keys] == [None, "1"]
    assert [entry(ort_session(small_onnx, spinning="on"), k) for k in keys] == [None, None]


def test_named_providers_are_checked(small_onnx):
    with pytest.raises(DependencyError, match=r"no NoSuchExecutionProvider .*available: .*CPUExecutionProvider"):
        ort_session(small_onnx, providers=["NoSuchExecutionProvider"])
    with pytest.raises(OptionError, match=r"providers=\[\] names no execution provider"):
        ort_session(small_onnx, providers=[])


def test_a_load_failure_names_the_providers_libraries_only_when_one_was_asked_for(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx graph")
    with pytest.raises(InputFileError, match="opset this onnxruntime supports") as cpu:
        ort_session(bad)
    assert "libraries" not in str(cpu.value)
    other = [p for p in ort.get_available_providers() if p != "CPUExecutionProvider"]
    if not other:
        pytest.skip("this onnxruntime has only the CPU provider")
    with pytest.raises(InputFileError, match=rf"opset .* or check the libraries that {other[0]} needs"):
        ort_session(bad, providers=[other[0], "CPUExecutionProvider"])
