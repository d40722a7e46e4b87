"""Bad input to calibrate / finetune / train: one line, exit 2, nothing written."""

from __future__ import annotations

import pytest
from PIL import Image

from repconv.cli import main


def _fails(capsys, tmp_path, *args: str) -> str:
    before = set(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert set(tmp_path.rglob("*")) == before, "something was written"
    return err


def test_distill_without_teacher(capsys, tmp_path, digits_converted):
    err = _fails(capsys, tmp_path, "finetune", digits_converted, "--data", "digits", "--objective", "distill",
                 "-o", str(tmp_path / "o.repconv.safetensors"))
    assert "--teacher" in err


def test_empty_data_folder(capsys, tmp_path, digits_converted):
    (tmp_path / "empty").mkdir()
    err = _fails(capsys, tmp_path, "finetune", digits_converted, "--data", str(tmp_path / "empty"),
                 "-o", str(tmp_path / "o.repconv.safetensors"))
    assert "class subfolders" in err or "no usable image" in err


def test_labels_do_not_match_classifier(capsys, tmp_path, digits_converted):
    for c in ("a", "b", "c"):
        (tmp_path / "data" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "data" / c / "x.png")
    err = _fails(capsys, tmp_path, "finetune", digits_converted, "--data", str(tmp_path / "data"),
                 "-o", str(tmp_path / "o.repconv.safetensors"))
    assert "3 classes" in err and "10 outputs" in err


def test_calibrate_model_without_replaced_unit(capsys, tmp_path, digits_checkpoint):
    err = _fails(capsys, tmp_path, "calibrate", digits_checkpoint, "--data", "digits", "--teacher",
                 digits_checkpoint, "-o", str(tmp_path / "o.repconv.safetensors"))
    assert "no replaced unit" in err


def test_calibrate_without_teacher(capsys, tmp_path, digits_converted):
    err = _fails(capsys, tmp_path, "calibrate", digits_converted, "--data", "digits",
                 "-o", str(tmp_path / "o.repconv.safetensors"))
    assert "--teacher" in err
