import numpy as np
import pytest
import torch

from repconv.convert.graph import count_flops, count_params, example_input
from repconv.errors import DependencyError, InputFileError, OptionError
from repconv.onnx_graph import onnx_macs
from repconv.runtime import open_session


def test_torch_and_ort_sessions_agree(small_checkpoint, small_onnx):
    x = example_input((3, 32, 32), batch=5, seed=3).numpy()
    with open_session(small_checkpoint) as ts, open_session(small_onnx) as os_:
        assert (ts.backend, os_.backend) == ("torch", "ort")
        assert ts.input_size == os_.input_size == (3, 32, 32)
        assert os_.class_names == ts.class_names == [f"class_{i}" for i in range(10)]
        np.testing.assert_allclose(os_.mean, ts.mean)
        a, b = ts.run(x), os_.run(torch.from_numpy(x))
        assert a.shape == b.shape == (5, 10) and a.dtype == b.dtype == np.float32
        assert np.abs(a - b).max() < 1e-4
        assert os_.run(x[:1]).shape == (1, 10)  # dynamic batch


def test_param_and_mac_counts_match_between_backends(small_checkpoint, small_onnx):
    ts, os_ = open_session(small_checkpoint), open_session(small_onnx)
    assert ts.count_params() == count_params(ts.model)
    flops = count_flops(ts.model, example_input((3, 32, 32), batch=1))
    assert ts.count_macs() == flops // 2
    # the ONNX is unfolded here (BN kept as its own op), so its weights are the conv/linear ones plus BN's
    assert 0.95 * ts.count_params() <= os_.count_params() <= ts.count_params()
    assert abs(os_.count_macs() - ts.count_macs()) / ts.count_macs() < 0.02


def test_onnx_macs_of_a_plain_conv(tmp_path):
    import onnx

    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, groups=1), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 16 * 16, 10))
    path = tmp_path / "c.onnx"
    torch.onnx.export(conv, (torch.randn(2, 3, 16, 16),), str(path), input_names=["input"], dynamo=False,
                      dynamic_axes={"input": {0: "batch"}})
    expected = 8 * 16 * 16 * 3 * 9 + 8 * 16 * 16 * 10
    assert onnx_macs(onnx.load(str(path))) == expected


def test_artifact_errors(tmp_path, small_checkpoint, small_onnx):
    with pytest.raises(InputFileError, match="does not exist"):
        open_session(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not onnx")
    with pytest.raises(InputFileError, match="not a readable ONNX"):
        open_session(bad)
    with pytest.raises(OptionError, match=r"backend='torch' cannot run .*, which is an ONNX file"):
        open_session(small_onnx, backend="torch")
    with pytest.raises(OptionError, match=r"backend='ort' cannot run .*, which is a PyTorch checkpoint"):
        open_session(small_checkpoint, backend="ort")
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        with pytest.raises(DependencyError, match="onnxruntime-gpu"):
            open_session(small_onnx, device="cuda")


def test_fixed_batch_onnx_refuses_other_batches(tmp_path, small_checkpoint):
    path = tmp_path / "static.onnx"
    model = open_session(small_checkpoint).model
    torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), str(path), input_names=["input"],
                      output_names=["logits"], dynamo=False)
    s = open_session(path)
    assert s.accepts_batch(2) and not s.accepts_batch(3)
    assert not s.info.known  # no metadata: size from the graph, mean/std defaults
    assert s.input_size == (3, 32, 32)
    with pytest.raises(InputFileError, match="fixed batch of 2"):
        s.run(np.zeros((3, 3, 32, 32), np.float32))


def test_channels_last_torch_session_gives_the_same_logits(tmp_path, small_checkpoint, small_onnx):
    import repconv

    pf = repconv.convert(small_checkpoint, method="parameter-free", pf_policy="all",
                         output=tmp_path / "pf.repconv.safetensors").output
    x = example_input((3, 32, 32), batch=4, seed=1).numpy()
    for path in (small_checkpoint, pf):
        nchw, nhwc = open_session(path), open_session(path, channels_last=True)
        conv = next(m for m in nhwc.model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert not conv.weight.is_contiguous()  # really converted, not a no-op
        np.testing.assert_allclose(nhwc.run(x), nchw.run(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(OptionError, match="channels_last applies to PyTorch checkpoints only"):
        open_session(small_onnx, channels_last=True)
