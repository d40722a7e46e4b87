"""TensorRT: everything the build consumes is checked here; the build itself needs TensorRT and a GPU."""

import json

import pytest
import torch
from onnx import TensorProto, helper

from repconv import api
from repconv.artifact import ArtifactInfo
from repconv.errors import DependencyError, InputFileError, OptionError
from repconv.export.engine import (
    EngineSidecar,
    TensorRTEnvironment,
    check_compatible,
    require_tensorrt,
    sidecar_path,
    tensorrt_environment,
)
from repconv.export.tensorrt import (
    EngineOptions,
    _network_flags,
    profile_shapes,
    trtexec_command,
    verification_batches,
)
from repconv.onnx_graph import graph_dtype, parity, read_onnx
from repconv.runtime import open_session

ENV = tensorrt_environment()
NO_TRT = "; ".join(ENV.missing())


def needs_tensorrt():
    if NO_TRT:
        pytest.skip(f"needs TensorRT and an NVIDIA GPU: {NO_TRT}")


@pytest.fixture
def static_onnx(tmp_path, small_checkpoint):
    path = tmp_path / "static.onnx"
    torch.onnx.export(open_session(small_checkpoint).model, (torch.randn(4, 3, 32, 32),), str(path),
                      input_names=["input"], output_names=["logits"], dynamo=False)
    return path


def test_read_onnx_and_profile(small_onnx):
    graph = read_onnx(small_onnx)
    (inp,) = graph.inputs
    assert inp.name == "input" and inp.dtype == "float32" and not isinstance(inp.shape[0], int)
    assert inp.shape[1:] == (3, 32, 32) and graph.outputs[0].name == "logits"
    assert graph.dtype == "fp32" and ArtifactInfo.from_onnx_props(graph.metadata).class_names[3] == "class_3"
    assert graph.params > 250_000 and graph.macs > 4e7
    assert graph.dynamic
    shapes = profile_shapes(graph, EngineOptions(min_batch=2, opt_batch=4, max_batch=16))
    assert shapes == {"input": {"min": [2, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [16, 3, 32, 32]}}
    assert verification_batches(shapes) == [2, 4]


def test_static_onnx_needs_no_profile(static_onnx):
    graph = read_onnx(static_onnx)
    assert not graph.dynamic
    shapes = profile_shapes(graph, EngineOptions())
    assert shapes["input"]["min"] == shapes["input"]["max"] == [4, 3, 32, 32]
    cmd = trtexec_command(static_onnx, "x.engine", shapes, EngineOptions(), dynamic=False)
    assert not any(c.startswith(("--minShapes", "--optShapes", "--maxShapes")) for c in cmd)


def test_trtexec_command(small_onnx, tmp_path):
    options = EngineOptions(1, 8, 32, workspace_mib=512, timing_cache=tmp_path / "t.cache", optimization_level=5)
    shapes = profile_shapes(read_onnx(small_onnx), options)
    cmd = trtexec_command(small_onnx, "out.engine", shapes, options)
    assert cmd[0] == "trtexec" and f"--onnx={small_onnx}" in cmd and "--saveEngine=out.engine" in cmd
    for flag in ("--stronglyTyped", "--minShapes=input:1x3x32x32", "--optShapes=input:8x3x32x32",
                 "--maxShapes=input:32x3x32x32", "--memPoolSize=workspace:512M",
                 f"--timingCacheFile={tmp_path / 't.cache'}", "--builderOptimizationLevel=5"):
        assert flag in cmd
    assert not any(flag in " ".join(cmd) for flag in ("--fp16", "--int8", "--best"))  # precision is in the graph


@pytest.mark.parametrize("kwargs, match", [(dict(min_batch=4, opt_batch=2), "not ordered"),
                                           (dict(optimization_level=7), "out of range"),
                                           (dict(workspace_mib=0), "not positive")])
def test_engine_options_validate(kwargs, match):
    with pytest.raises(OptionError, match=match):
        EngineOptions(**kwargs).validate()


def _tiny_graph(initializer_type, ops=("Add",)):
    w = helper.make_tensor("w", initializer_type, [1], [1])
    nodes = [helper.make_node(op, ["x", "w"], ["y"]) for op in ops[:1]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", initializer_type, [1])],
                              [helper.make_tensor_value_info("y", initializer_type, [1])], [w])
    return helper.make_model(graph)


def test_precision_is_read_from_the_graph():
    assert graph_dtype(_tiny_graph(TensorProto.FLOAT)) == "fp32"
    assert graph_dtype(_tiny_graph(TensorProto.FLOAT16)) == "fp16"
    assert graph_dtype(_tiny_graph(TensorProto.FLOAT, ("QuantizeLinear",))) == "int8"
    said = _tiny_graph(TensorProto.FLOAT)
    helper.set_model_props(said, {"repconv.dtype": "fp16"})
    assert graph_dtype(said) == "fp16"  # export's word


class _FakeFlags:
    STRONGLY_TYPED = 1


@pytest.mark.parametrize("flags, expected", [(_FakeFlags, 2), (object, 0)])
def test_network_flags_for_trt10_and_11(flags, expected):
    """TRT 10: STRONGLY_TYPED is set; a TRT without the flag (always strongly typed) gets 0."""
    trt = type("trt", (), {"NetworkDefinitionCreationFlag": flags})
    assert _network_flags(trt) == expected


def test_parity_of_logits():
    ref = torch.tensor([[1.0, 2.0], [3.0, -1.0]]).numpy()
    p = parity(ref, ref + 0.03)
    assert p.max_abs == pytest.approx(0.03) and p.max_rel == pytest.approx(0.01)
    assert p.top1_agreement == 1.0 and p.batch_sizes == (2,)
    assert parity(ref, ref[:, ::-1]).top1_agreement == 0.0


def _sidecar(**versions):
    base = {"tensorrt": "10.8.0", "cuda": "12.6", "gpu": "NVIDIA L4", "compute_capability": "8.9"}
    return EngineSidecar(onnx="m.onnx", onnx_sha256="0" * 64, onnx_metadata={"repconv.input_size": "[3, 32, 32]",
                         "repconv.class_names": '["a", "b"]', "repconv.dtype": "fp16"},
                         inputs={"input": {"min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [32, 3, 32, 32]}},
                         outputs=["logits"], dtype="fp16", builder={"strongly_typed": True},
                         versions={**base, **versions}, params=10, macs=20)


def test_sidecar_round_trip_and_errors(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"serialized")
    with pytest.raises(InputFileError, match=r"has no sidecar 'm\.engine\.json'"):
        EngineSidecar.read(engine)
    sidecar = _sidecar()
    sidecar_path(engine).write_text(sidecar.to_json())
    back = EngineSidecar.read(engine)
    assert back == sidecar
    info = back.info()
    assert info.kind == "engine" and info.input_size == (3, 32, 32) and info.class_names == ["a", "b"]
    assert info.dtype == "fp16"
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(InputFileError, match="not valid JSON"):
        EngineSidecar.read(engine)
    sidecar_path(engine).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputFileError, match="not a repconv engine sidecar"):
        EngineSidecar.read(engine)


def test_version_check_refuses_mismatches():
    here = TensorRTEnvironment("10.8.0", "12.6", "NVIDIA L4", "8.9")
    check_compatible("m.engine", _sidecar().versions, here)  # same versions: accepted
    with pytest.raises(InputFileError, match=r"built for TensorRT 10\.3\.0 \(here: 10\.8\.0\).*rebuild it"):
        check_compatible("m.engine", _sidecar(tensorrt="10.3.0").versions, here)
    cc = r"compute capability 8\.0 / NVIDIA A100 \(here: 8\.9 / NVIDIA L4\)"
    with pytest.raises(InputFileError, match=cc):
        check_compatible("m.engine", _sidecar(compute_capability="8.0", gpu="NVIDIA A100").versions, here)
    with pytest.raises(InputFileError, match=r"CUDA 11\.8"):
        check_compatible("m.engine", _sidecar(cuda="11.8").versions, here)
    check_compatible("m.engine", _sidecar(cuda="12.2").versions, here)  # same CUDA major is fine


def test_require_tensorrt_message():
    with pytest.raises(DependencyError) as exc:
        require_tensorrt("building a TensorRT engine", TensorRTEnvironment(None, "12.6", None, None))
    text = str(exc.value)
    assert "pip install 'repconv[tensorrt]'" in text and "NVIDIA GPU" in text and "TensorRT is not installed" in text
    assert len(text.splitlines()) == 1
    require_tensorrt("x", TensorRTEnvironment("10.8.0", "12.6", "NVIDIA L4", "8.9"))  # all there: no error


def test_engine_without_tensorrt_is_refused_clearly(tmp_path):
    if not NO_TRT:
        pytest.skip("TensorRT and a GPU are present: the refusal path does not apply")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"serialized")
    sidecar_path(engine).write_text(_sidecar().to_json())
    with pytest.raises(DependencyError, match="running a TensorRT engine needs TensorRT and an NVIDIA GPU"):
        open_session(engine)
    with pytest.raises(DependencyError, match="NVIDIA GPU only"):
        open_session(engine, device="cpu")


def test_export_engine_cli_without_tensorrt(run_cli, small_onnx, small_checkpoint, tmp_path):
    if not NO_TRT:
        pytest.skip("TensorRT and a GPU are present: the missing-dependency path does not apply")
    target = tmp_path / "m.engine"
    code, _out, err = run_cli("export", small_onnx, "--format", "engine", "-o", target)
    assert code == 2 and "pip install 'repconv[tensorrt]'" in err and "NVIDIA GPU" in err
    assert len(err.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []
    code, _out, err = run_cli("export", small_checkpoint, "--format", "engine", "-o", target)  # no ONNX either
    assert code == 2 and "pip install 'repconv[tensorrt]'" in err and list(tmp_path.iterdir()) == []


def test_print_trtexec_cli(run_cli, small_onnx, small_checkpoint, tmp_path):
    code, out, err = run_cli("export", small_onnx, "--format", "engine", "-o", tmp_path / "m.engine",
                             "--print-trtexec", "--max-batch", "64", "--timing-cache", tmp_path / "tc.bin")
    assert code == 0, err
    line = out.strip()
    assert line.startswith("trtexec ") and "--maxShapes=input:64x3x32x32" in line and "--stronglyTyped" in line
    assert f"--timingCacheFile={tmp_path / 'tc.bin'}" in line and list(tmp_path.iterdir()) == []
    code, out, err = run_cli("export", small_checkpoint, "--format", "engine", "-o", tmp_path / "m.engine",
                             "--print-trtexec", "--json")
    plan = json.loads(out)
    assert plan["onnx"] == str(tmp_path / "m.onnx") and plan["dynamic"]
    assert plan["onnx_first"].startswith("repconv export ") and "--format onnx" in plan["onnx_first"]
    assert plan["shapes"]["input"]["opt"] == [8, 3, 32, 32]


@pytest.mark.tensorrt
def test_build_engine_and_run_it(small_onnx, tmp_path):
    needs_tensorrt()
    target = tmp_path / "m.engine"
    cache = tmp_path / "timing.cache"
    build = api.build_engine(small_onnx, target, EngineOptions(1, 4, 8, timing_cache=cache))
    assert target.is_file() and sidecar_path(target).is_file() and cache.is_file()
    assert all(fig["max_rel"] <= fig["tolerance_rel"] for fig in build.verification.values())
    sidecar = EngineSidecar.read(target)
    assert sidecar.versions["tensorrt"] == ENV.tensorrt and sidecar.inputs["input"]["max"][0] == 8
    x = torch.randn(3, 3, 32, 32).numpy()
    with open_session(target) as trt_session, open_session(small_onnx, device="cpu") as ort_session:
        assert trt_session.backend == "trt" and trt_session.class_names == ort_session.class_names
        ref, got = ort_session.run(x), trt_session.run(x)
        assert parity(ref, got).max_rel < 5e-3
    data = json.loads(sidecar_path(target).read_text())
    data["versions"]["tensorrt"] = "0.0.1"
    sidecar_path(target).write_text(json.dumps(data))
    with pytest.raises(InputFileError, match=r"built for TensorRT 0\.0\.1"):
        open_session(target)


@pytest.mark.tensorrt
def test_onnx_checked_before_any_engine_file(tmp_path):
    """With TensorRT present, a non-ONNX source is refused before anything is written."""
    needs_tensorrt()
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"nope")
    with pytest.raises(InputFileError, match="not a readable ONNX"):
        api.build_engine(bad, tmp_path / "x.engine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"]
