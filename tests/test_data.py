"""make_dataset: digits, labeled folder trees, unlabeled folders, unusable files."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from repconv.data import DIGITS_CLASSES, has_split, make_dataset
from repconv.errors import DataError, OptionError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _png(path, color, size=(20, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_digits_split_size_and_labels():
    train, val = make_dataset("digits", "train", 16, MEAN, STD), make_dataset("digits", "val", (3, 16, 16), MEAN, STD)
    assert len(train) + len(val) == 1797 and abs(len(val) - 359) <= 1
    x, y = val[0]
    assert x.shape == (3, 16, 16) and 0 <= int(y) <= 9 and val.classes == DIGITS_CLASSES
    unlabeled = make_dataset("digits", "val", 16, MEAN, STD, labeled=False)
    assert int(unlabeled[0][1]) == -1 and torch.equal(unlabeled[0][0], x)


def test_labeled_tree_preprocesses_and_skips_bad_files(tmp_path, caplog):
    _png(tmp_path / "train" / "cat" / "a.png", (255, 0, 0))
    _png(tmp_path / "train" / "dog" / "b.png", (0, 0, 255), size=(30, 40))
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with caplog.at_level(logging.WARNING, logger="repconv.data"):
        ds = make_dataset(tmp_path, "train", 8, MEAN, STD)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and any("notes.txt" in w for w in warnings) and any("broken.png" in w for w in warnings)
    assert all("\n" not in w for w in warnings)
    assert ds.classes == ["cat", "dog"] and len(ds) == 2
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and y == 0
    # pure red, normalized with mean 0.5 / std 0.25: channel 0 -> 2.0, channels 1, 2 -> -2.0
    assert torch.allclose(x[:, 4, 4], torch.tensor([2.0, -2.0, -2.0]), atol=1e-5)
    assert has_split(tmp_path, "train") and not has_split(tmp_path, "val")


def test_flat_folder_is_unlabeled_data(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.jpg", (i * 80, 10, 10))
    ds = make_dataset(tmp_path, "train", 12, MEAN, STD, labeled=False)
    assert len(ds) == 3 and ds.classes is None and all(ds[i][1] == -1 for i in range(3))
    with pytest.raises(DataError, match="no class subfolders"):
        make_dataset(tmp_path, "train", 12, MEAN, STD, labeled=True)


def test_folder_without_usable_image_is_an_error(tmp_path):
    (tmp_path / "readme.md").write_text("hello")
    with pytest.raises(DataError, match="no usable image"):
        make_dataset(tmp_path, "train", 12, MEAN, STD, labeled=False)
    with pytest.raises(OptionError, match=r"data='.*missing' is neither 'digits' nor an existing folder"):
        make_dataset(tmp_path / "missing", "train", 12, MEAN, STD)
