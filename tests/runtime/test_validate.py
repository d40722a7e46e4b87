"""validate: several artifacts scored side by side on the same labeled data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from repconv.data import digits_images
from repconv.errors import DataError, OptionError
from repconv.runtime.validate import validate


def _digit_folder(root, classes=10, per_class=3):
    """ROOT/CLASS/*.png from the validation digits (32x32 RGB)."""
    x, y = digits_images("val")
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    for c in range(classes):
        folder = root / str(c)
        folder.mkdir(parents=True, exist_ok=True)
        for i, idx in enumerate(torch.nonzero(y == c).flatten()[:per_class].tolist()):
            img = (x[idx, 0].numpy() * 255).round().astype(np.uint8)
            Image.fromarray(img).convert("RGB").save(folder / f"{i}.png")
    return root


def test_checkpoint_and_its_onnx_agree(digits_checkpoint, digits_onnx):
    messages = []
    result = validate([digits_checkpoint, digits_onnx], data="digits", batch_size=128, progress=messages.append)
    ckpt, onnx = result.scores
    assert (ckpt.backend, onnx.backend) == ("torch", "ort")
    assert result.split == "val" and result.samples == 359 and sum(result.class_counts.values()) == 359
    assert ckpt.top1 >= 0.95 and ckpt.top5 >= ckpt.top1 and abs(ckpt.top1 - onnx.top1) <= 1 / 359
    assert result.agreement[0][1] >= 0.997 and result.agreement[0][0] == 1.0
    assert set(ckpt.per_class) == set(result.classes) == {str(i) for i in range(10)}
    assert not result.warnings and ckpt.class_names_match
    assert sum(m.startswith("data: digits") for m in messages) == 1  # one dataset for both: same input contract
    text = "\n".join(result.summary())
    assert "top-1 agreement: #0-#1" in text
    json.dumps(result.to_dict())


def test_small_artifacts_agree_and_class_names_differences_warn(small_checkpoint, small_onnx):
    result = validate([small_checkpoint, small_onnx], data="digits", limit=50)
    assert result.samples == 50 and len([c for c, n in result.class_counts.items() if n]) >= 8
    assert result.agreement[0][1] == 1.0
    assert result.scores[0].top1 == result.scores[1].top1
    assert not result.scores[0].class_names_match and "'class_0' vs '0'" in result.warnings[0]


def test_folder_uses_val_and_class_count_mismatch_is_a_data_error(small_checkpoint, tmp_path):
    _digit_folder(tmp_path / "ten" / "val")
    _digit_folder(tmp_path / "ten" / "train", per_class=1)
    result = validate([small_checkpoint], data=tmp_path / "ten")
    assert result.split == "val" and result.samples == 30 and set(result.class_counts.values()) == {3}
    three = _digit_folder(tmp_path / "three", classes=3, per_class=2)
    with pytest.raises(DataError, match=r"predicts 10 classes, the data '.*three' has 3 \(0, 1, 2\)"):
        validate([small_checkpoint], data=three)
    _digit_folder(tmp_path / "only_train" / "train", classes=10, per_class=1)
    with pytest.raises(DataError, match="no val subfolder"):
        validate([small_checkpoint], data=tmp_path / "only_train")


def test_bad_options(small_checkpoint, tmp_path):
    with pytest.raises(OptionError, match="validate needs at least one"):
        validate([])
    with pytest.raises(OptionError, match="limit=0 is not positive"):
        validate([small_checkpoint], limit=0)
    with pytest.raises(OptionError, match="neither 'digits' nor an existing folder"):
        validate([small_checkpoint], data=tmp_path / "nope")
