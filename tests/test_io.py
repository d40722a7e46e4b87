"""Files: recognised by content whatever their names, written atomically with the mode a plain write gives."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import repconv
from repconv.checkpoint import CheckpointMeta, save, save_state_dict
from repconv.errors import OutputError
from repconv.io import artifact_backend, check_output_path, sniff
from repconv.models import resolve_arch


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_sniff_by_content(tmp_path, small_onnx):
    sd = {"w": torch.zeros(3)}
    save_file(sd, str(tmp_path / "weights.pt"))  # safetensors bytes under a .pt name
    torch.save(sd, tmp_path / "zip.safetensors")  # torch's zip under a .safetensors name
    torch.save(sd, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    (tmp_path / "model.onnx.bak").write_bytes(Path(small_onnx).read_bytes())
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.pt").write_text("hello\n")
    (tmp_path / "m.plan").write_bytes(b"\x01\x02engine bytes")
    (tmp_path / "m.plan.json").write_text(json.dumps({"format": "repconv-tensorrt-engine"}))
    kinds = {p.name: sniff(p) for p in tmp_path.iterdir() if not p.name.endswith(".json")}
    assert kinds == {"weights.pt": "safetensors", "zip.safetensors": "torch-zip", "legacy.bin": "pickle",
                     "model.onnx.bak": "onnx", "empty.pt": "empty", "notes.pt": "unknown", "m.plan": "engine"}
    assert artifact_backend(tmp_path / "model.onnx.bak") == "ort" and artifact_backend(tmp_path / "m.plan") == "trt"
    assert artifact_backend(tmp_path / "weights.pt") == "torch"


def test_a_repconv_file_named_pt_loads(tmp_path, small_checkpoint):
    named = tmp_path / "r20.pt"
    named.write_bytes(Path(small_checkpoint).read_bytes())
    loaded = repconv.load_checkpoint(named)  # no --arch: the header says it
    assert loaded.meta.arch == "repconv:cifar_resnet20" and loaded.meta.class_names[0] == "class_0"
    conv = repconv.convert(named, output=tmp_path / "c.repconv.safetensors")
    assert conv.summary.replaced_units


def test_written_files_get_the_mode_of_a_plain_write(tmp_path, umask_022):
    spec = resolve_arch("cifar_resnet8")
    model = spec.build()
    save(tmp_path / "a.repconv.safetensors", model, CheckpointMeta.for_arch(spec))
    save_state_dict(tmp_path / "b.safetensors", model.state_dict())  # safetensors' save_file recreates the file
    save_state_dict(tmp_path / "c.pt", model.state_dict())
    for name in ("a.repconv.safetensors", "b.safetensors", "c.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.isdir("/proc"), reason="root on Linux: /proc passes os.access")
def test_unwritable_folders_are_found_before_any_work():
    with pytest.raises(OutputError, match=r"cannot write '/proc/x\.safetensors'"):
        check_output_path("/proc/x.safetensors")
