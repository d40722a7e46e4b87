import json

import jsonschema
import numpy as np
import pytest
import torch
from PIL import Image

from repconv import api
from repconv.cli.options import parse_ints
from repconv.errors import DependencyError, InputFileError, OptionError, OutputError
from repconv.runtime.bench import schema, validate_report

FAST = dict(warmup=1, repeats=3, max_seconds=2.0, threads=1)


@pytest.fixture(scope="module")
def report(small_checkpoint, small_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    messages = []
    rep = api.bench([small_checkpoint, small_onnx], batches=(1, 3), json_out=out / "bench.json",
                    plot=out / "bench.png", progress=messages.append, **FAST)
    assert messages == ["[1/4] small.repconv.safetensors [torch] batch 1", "[2/4] small.repconv.safetensors "
                        "[torch] batch 3", "[3/4] small.onnx [ort] batch 1", "[4/4] small.onnx [ort] batch 3"]
    return rep, out


def test_parse_ints():
    assert parse_ints("1,8,32", "batches", "1,8,32") == (1, 8, 32)
    assert parse_ints(" 4 , 4,2", "batches", "1,8,32") == (4, 2)
    for bad in ("1,x", "", "0,2", "-1", "1.5"):
        with pytest.raises(OptionError, match="does not parse"):
            parse_ints(bad, "batches", "1,8,32")


def test_bench_measures_both_artifacts_on_the_same_inputs(report, small_checkpoint, small_onnx):
    rep, _ = report
    torch_t, ort_t = rep.targets
    assert (torch_t.backend, ort_t.backend) == ("torch", "ort")
    assert rep.baseline == torch_t.label
    # the same seeded inputs: the ONNX export of the same weights gives the same logits
    assert ort_t.max_abs_diff_vs_baseline < 1e-4 and ort_t.top1_agreement_vs_baseline == 1.0
    for t in (torch_t, ort_t):
        assert [x.batch for x in t.timings] == [1, 3]
        for timing in t.timings:
            assert len(timing.latencies_ms) == 3 and all(v > 0 for v in timing.latencies_ms)
            assert timing.median_ms == pytest.approx(float(np.median(timing.latencies_ms)), rel=1e-3)
            assert timing.p90_ms >= timing.median_ms
            assert timing.throughput == pytest.approx(timing.batch / timing.median_ms * 1e3)
    assert all(t.speedup == pytest.approx(1.0) for t in torch_t.timings)
    for base, other in zip(torch_t.timings, ort_t.timings, strict=True):
        assert other.speedup == pytest.approx(base.median_ms / other.median_ms)
    assert torch_t.macs == pytest.approx(ort_t.macs, rel=0.02) and torch_t.macs > 1e7
    assert torch_t.file_bytes == __import__("os").path.getsize(small_checkpoint)
    assert torch_t.peak_memory_bytes > 0 and torch_t.peak_rss_bytes >= torch_t.peak_memory_bytes
    assert rep.machine["torch_threads"] == 1 and rep.machine["versions"]["onnxruntime"]
    assert rep.options["size"] == 32


def test_bench_json_file_and_schema(report):
    rep, out = report
    data = json.loads((out / "bench.json").read_text())
    assert data == json.loads(json.dumps(rep.to_dict()))
    validate_report(data)
    broken = json.loads(json.dumps(data))
    del broken["targets"][0]["timings"][0]["median_ms"]
    with pytest.raises(jsonschema.ValidationError):
        validate_report(broken)
    broken = json.loads(json.dumps(data))
    broken["targets"][1]["backend"] = "tensorflow"
    with pytest.raises(jsonschema.ValidationError):
        validate_report(broken)
    assert schema()["properties"]["schema_version"]["const"] == data["schema_version"]


def test_bench_plot_is_a_png(report):
    _, out = report
    with Image.open(out / "bench.png") as img:
        assert img.format == "PNG" and img.size[0] > 500


def test_fixed_batch_onnx_is_skipped_at_other_batches(tmp_path, small_checkpoint):
    from repconv.runtime import open_session

    path = tmp_path / "static.onnx"
    torch.onnx.export(open_session(small_checkpoint).model, (torch.randn(2, 3, 32, 32),), str(path),
                      input_names=["input"], output_names=["logits"], dynamo=False)
    rep = api.bench([path], batches=(1, 2), **FAST)
    (t,) = rep.targets
    assert [x.batch for x in t.timings] == [2] and "1" in t.skipped


def test_bench_channels_last_runs_torch_targets_in_that_format(tmp_path, small_checkpoint, small_onnx):
    rep = api.bench([small_onnx, small_checkpoint], batches=(2,), channels_last=True, json_out=tmp_path / "b.json",
                    **FAST)
    ort_t, torch_t = rep.targets
    assert (ort_t.backend, torch_t.backend) == ("ort", "torch")  # the ONNX file is unaffected, not refused
    assert torch_t.max_abs_diff_vs_baseline < 1e-4 and torch_t.top1_agreement_vs_baseline == 1.0
    data = json.loads((tmp_path / "b.json").read_text())
    validate_report(data)
    assert data["options"]["channels_last"] is True


def test_bench_bad_input(tmp_path, small_checkpoint, small_onnx):
    with pytest.raises(InputFileError, match="does not exist"):
        api.bench([small_checkpoint, tmp_path / "nope.onnx"], **FAST)
    with pytest.raises(OutputError, match="does not exist"):
        api.bench([small_checkpoint], json_out=tmp_path / "missing" / "b.json", **FAST)
    with pytest.raises(OptionError, match="image suffix"):
        api.bench([small_checkpoint], plot=tmp_path / "plot.txt", **FAST)
    with pytest.raises(OptionError, match="leaves out"):
        engine = tmp_path / "x.engine"
        engine.write_bytes(b"x")
        api.bench([engine], backends=["torch", "ort"], **FAST)
    engine.unlink()
    with pytest.raises(OptionError, match="backends='tf' is not a known choice"):
        api.bench([small_onnx], backends=["tf"], **FAST)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(InputFileError, match="not a readable ONNX"):
        api.bench([bad], **FAST)
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob(".*part"))


def test_bench_exports_a_checkpoint_for_the_ort_backend(small_checkpoint):
    rep = api.bench([small_checkpoint], backends=["torch", "ort"], batches=(2,), **FAST)
    torch_t, ort_t = rep.targets
    assert (torch_t.backend, ort_t.backend) == ("torch", "ort") and ort_t.label.endswith("-> onnx")
    assert ort_t.path.endswith(".onnx") and ort_t.file_bytes > 0
    assert ort_t.max_abs_diff_vs_baseline < 1e-4 and ort_t.top1_agreement_vs_baseline == 1.0
    assert ort_t.macs == pytest.approx(torch_t.macs, rel=0.02)  # BN fused by export: MACs stay


def test_bench_tensorrt_targets_are_refused_up_front_without_tensorrt(tmp_path, small_checkpoint, small_onnx):
    from repconv.export.engine import sidecar_path, tensorrt_environment

    if not tensorrt_environment().missing():
        pytest.skip("TensorRT and a GPU are present: nothing to refuse")
    with pytest.raises(DependencyError, match="pip install 'repconv\\[tensorrt\\]'"):
        api.bench([small_checkpoint, small_onnx], backends=["torch", "ort", "trt"], **FAST)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    sidecar_path(engine).write_text("{}")
    with pytest.raises(DependencyError, match=r"benchmarking 'm\.engine' with TensorRT"):
        api.bench([small_checkpoint, engine], **FAST)


def test_bench_cli(run_cli, small_checkpoint, small_onnx, tmp_path):
    code, out, err = run_cli("bench", small_checkpoint, small_onnx, "--batch", "2", "--repeats", "3", "--warmup",
                             "1", "--threads", "1", "--json")
    assert code == 0, err
    data = json.loads(out)
    validate_report(data)
    assert [t["backend"] for t in data["targets"]] == ["torch", "ort"]
    code, out, err = run_cli("bench", small_checkpoint, "--batch", "1", "--repeats", "3", "--warmup", "0",
                             "--channels-last")
    assert code == 0, err
    assert "torch in channels_last" in out
    code, out, err = run_cli("bench", small_checkpoint, "--batch", "1,two")
    assert code == 2 and "--batch 1,two does not parse" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli("bench", tmp_path / "missing.pt")
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli("bench", small_checkpoint, "--plot", tmp_path / "no" / "such" / "dir" / "p.png")
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    assert out == ""  # refused before measuring anything
