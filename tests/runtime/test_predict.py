import json

import numpy as np
import pytest
import torch
from PIL import Image

from repconv import api
from repconv.artifact import ArtifactInfo
from repconv.data import digits_images
from repconv.errors import DataError, OptionError
from repconv.runtime.preprocess import expand_paths, transform_for


def _save_digits(folder, n=40):
    """The first n validation digits as 32x32 RGB PNG files named by their label."""
    x, y = digits_images("val")
    x = torch.nn.functional.interpolate(x[:n], size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, label) in enumerate(zip(x, y[:n], strict=True)):
        path = folder / f"{i:03d}_label{int(label)}.png"
        Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8)).convert("RGB").save(path)
        paths.append(path)
    return paths, y[:n].tolist()


def test_transform_resizes_crops_and_normalizes():
    info = ArtifactInfo((3, 32, 32), (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    out = transform_for(info)(Image.new("RGB", (80, 48), (255, 102, 0)))
    assert out.shape == (3, 32, 32)
    expected = torch.tensor([(1 - 0.5) / 0.2, (0.4 - 0.4) / 0.25, (0 - 0.3) / 0.5]).view(3, 1, 1)
    assert torch.allclose(out, expected.expand_as(out), atol=1e-5)


def test_expand_paths_walks_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPG", "sub/c.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in expand_paths([tmp_path])] == ["a.JPG", "b.png", "c.png"]


def test_predict_topk_structure_and_bad_files(tmp_path, small_checkpoint, small_onnx):
    paths, _ = _save_digits(tmp_path / "imgs", n=5)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not really a png")
    result = api.predict(small_checkpoint, [tmp_path / "imgs", tmp_path / "gone.jpg"], top_k=3)
    assert [p.path for p in result.predictions] == [str(p) for p in paths]
    assert len(result.warnings) == 2
    assert any("broken.png' is not an image file" in w for w in result.warnings)
    assert any("gone.jpg' does not exist" in w for w in result.warnings)
    for p in result.predictions:
        probs = [s.probability for s in p.top]
        assert len(p.top) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(s.label == f"class_{s.index}" for s in p.top)
    onnx_result = api.predict(small_onnx, paths, top_k=3)
    for a, b in zip(result.predictions, onnx_result.predictions, strict=True):
        assert [s.index for s in a.top] == [s.index for s in b.top]
        assert np.allclose([s.probability for s in a.top], [s.probability for s in b.top], atol=1e-5)
    assert len(api.predict(small_checkpoint, paths[:1], top_k=10).predictions[0].top) == 10
    with pytest.raises(OptionError, match="top_k=50 is more than the model's 10 classes"):  # never silently cut
        api.predict(small_checkpoint, paths[:1], top_k=50)


def test_predict_errors(tmp_path, small_checkpoint):
    bad = tmp_path / "bad.png"
    bad.write_text("hello")
    with pytest.raises(DataError, match="no usable image"):
        api.predict(small_checkpoint, [bad])
    with pytest.raises(OptionError, match="top_k=0 is not positive"):
        api.predict(small_checkpoint, [bad], top_k=0)


def test_predict_cli(run_cli, tmp_path, small_onnx):
    paths, _ = _save_digits(tmp_path / "imgs", n=2)
    (tmp_path / "imgs" / "junk.jpg").write_text("junk")
    code, out, err = run_cli("predict", small_onnx, tmp_path / "imgs", "--top-k", "2", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["backend"] == "ort" and len(data["predictions"]) == 2
    assert [len(p["top"]) for p in data["predictions"]] == [2, 2]
    assert err.count("warning:") == 1 and "junk.jpg" in err
    code, out, err = run_cli("predict", small_onnx, *paths)
    assert code == 0 and "small.onnx [ort, cpu]" in out and out.count("class_") >= 2
    code, out, err = run_cli("predict", small_onnx, tmp_path / "imgs" / "junk.jpg")
    assert code == 2 and "no usable image" in err and "junk.jpg' is not an image file" in err
    assert len(err.strip().splitlines()) == 1


def test_predict_digits_accuracy_torch_and_onnx(tmp_path, digits_checkpoint):
    """Real images through the whole preprocessing: a digits-trained ResNet reads them correctly."""
    from helpers import export_onnx_for_tests

    _paths, labels = _save_digits(tmp_path / "digits", n=40)
    onnx_path = export_onnx_for_tests(digits_checkpoint, tmp_path / "digits.onnx")
    for artifact in (digits_checkpoint, onnx_path):
        result = api.predict(artifact, [tmp_path / "digits"], top_k=1)
        predicted = [int(p.top[0].label) for p in result.predictions]
        accuracy = np.mean(np.array(predicted) == np.array(labels))
        assert accuracy >= 0.9, (artifact, accuracy)
