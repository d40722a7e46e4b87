"""Low-level ONNX: reading a graph (inputs, metadata, params, MACs, precision), external weights above
protobuf's 2 GiB, opening ONNX Runtime sessions, and the parity metrics every check uses.

One place each: export, TensorRT verification, sessions, bench and the search's latency all read ONNX files
with :func:`load_onnx`, open sessions with :func:`ort_session` and compare outputs with :func:`parity`.
ONNX and ONNX Runtime are imported inside the functions, so importing this module is cheap.

External weights use the layout onnx, ONNX Runtime and TensorRT's parser read: ``model.onnx`` holds the
graph and names ``model.onnx.data`` (beside it) for every initializer above 1 KiB.
"""

from __future__ import annotations

import os
import tempfile
import typing
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from repconv.errors import DependencyError, InputFileError, OptionError

if TYPE_CHECKING:
    import onnx
    import torch

INPUT_NAME, OUTPUT_NAME = "input", "logits"
META_PREFIX = "repconv."  # ONNX metadata_props keys repconv writes (docs/export.md)
PROTOBUF_LIMIT = 2**31 - 1
DATA_SUFFIX = ".data"
ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}
T = TypeVar("T")
Spinning = Literal["off", "in-runs", "on"]  # ONNX Runtime worker threads (ort_session)


# ---------------------------------------------------------------- parity


@dataclass
class Parity:
    """How far a candidate's outputs are from a reference's on the same inputs.

    ``max_rel`` is max |difference| / max |reference|; ``top1_agreement`` the share of rows whose argmax
    matches (None when not measured).
    """

    max_abs: float
    max_rel: float
    top1_agreement: float | None = None
    batch_sizes: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    def worst(self, other: Parity) -> Parity:
        """The worse of two measurements (max errors, min agreement), over both batch lists."""
        agree = [a for a in (self.top1_agreement, other.top1_agreement) if a is not None]
        return Parity(max(self.max_abs, other.max_abs), max(self.max_rel, other.max_rel),
                      min(agree) if agree else None, self.batch_sizes + other.batch_sizes)


def parity(reference: Any, candidate: Any) -> Parity:
    """Compare two logit arrays (numpy or torch, (N, classes)) in float64."""
    ref = np.asarray(_numpy(reference), dtype=np.float64)
    cand = np.asarray(_numpy(candidate), dtype=np.float64)
    if ref.size == 0:
        return Parity(0.0, 0.0, None, (0,))
    diff = float(np.abs(ref - cand).max())
    scale = float(np.abs(ref).max())
    agree = float((ref.argmax(-1) == cand.argmax(-1)).mean()) if ref.ndim >= 2 else None
    return Parity(diff, diff / max(scale, 1e-12), agree, (int(ref.shape[0]),) if ref.ndim else ())


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().double().numpy()
    return np.asarray(x)


# ---------------------------------------------------------------- reading


def load_onnx(path: str | os.PathLike, weights: bool = False) -> onnx.ModelProto:
    """The ONNX file at ``path`` (graph only unless ``weights``); InputFileError when it is not one."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"'{path}' does not exist", "check the path")
    try:
        return onnx.load(str(path), load_external_data=weights)
    except Exception as exc:  # DecodeError, ValueError, ... for a file that is not ONNX
        raise InputFileError(f"'{path}' is not a readable ONNX file ({type(exc).__name__})",
                             "re-export it with `repconv export`") from exc


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``repconv.*`` metadata of an ONNX file, without the prefix (weights are not loaded)."""
    return {p.key[len(META_PREFIX):]: p.value for p in load_onnx(path).metadata_props
            if p.key.startswith(META_PREFIX)}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # str = symbolic dim
    dtype: str

    @property
    def dynamic(self) -> bool:
        return any(not isinstance(d, int) for d in self.shape)


@dataclass
class OnnxGraphInfo:
    """What an ONNX file declares: inputs, outputs, metadata, precision, params and MACs."""

    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    metadata: dict[str, str]
    dtype: str
    params: int
    macs: int

    @property
    def dynamic(self) -> bool:
        return any(spec.dynamic for spec in self.inputs)


_ONNX_TYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 3: "int8", 2: "uint8"}


def read_onnx(path: str | os.PathLike) -> OnnxGraphInfo:
    """Inputs, outputs, metadata and precision of an ONNX file (weights are not loaded)."""
    proto = load_onnx(path)
    if not proto.graph.input:
        raise InputFileError(f"'{path}' has no graph inputs", "give the .onnx file repconv export wrote")
    initializers = {t.name for t in proto.graph.initializer}

    def spec(vi) -> TensorSpec:
        t = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
        return TensorSpec(vi.name, dims, _ONNX_TYPES.get(t.elem_type, str(t.elem_type)))

    metadata = {p.key: p.value for p in proto.metadata_props}
    return OnnxGraphInfo(Path(path), [spec(v) for v in proto.graph.input if v.name not in initializers],
                         [spec(v) for v in proto.graph.output], metadata, graph_dtype(proto), onnx_params(proto),
                         onnx_macs(proto))


def graph_dtype(proto: onnx.ModelProto) -> str:
    """fp32 | fp16 | int8: what the metadata says export wrote, else what the graph's ops and weights show."""
    dtype = next((p.value for p in proto.metadata_props if p.key == META_PREFIX + "dtype" and p.value), None)
    if dtype:
        return dtype
    ops = {n.op_type for n in proto.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"}:
        return "int8"
    if any(t.data_type == 10 for t in proto.graph.initializer):
        return "fp16"
    return "fp32"


_WEIGHT_TYPES = {1, 2, 3, 6, 10, 11, 16}  # float, uint8, int8, int32, float16, double, bfloat16


def onnx_params(proto: onnx.ModelProto) -> int:
    """Weight elements stored in the graph: numeric initializers of more than one element (int8 weights
    count once, like fp32 ones; int64 shape constants and scalars do not count)."""
    return sum(n for t in proto.graph.initializer if t.data_type in _WEIGHT_TYPES
               and (n := int(np.prod(t.dims, dtype=np.int64))) > 1)


def onnx_macs(proto: onnx.ModelProto) -> int:
    """Multiply-accumulates of Conv, Gemm and MatMul for one sample (symbolic dims count as 1)."""
    import onnx

    g = onnx.shape_inference.infer_shapes(proto).graph
    shapes: dict[str, list[int]] = {t.name: list(t.dims) for t in g.initializer}
    for vi in (*g.input, *g.value_info, *g.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    total = 0
    for node in g.node:
        out = shapes.get(node.output[0])
        if node.op_type == "Conv" and out and node.input[1] in shapes:
            w = shapes[node.input[1]]
            total += int(np.prod(out[1:])) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul") and out and node.input[0] in shapes:
            k = shapes[node.input[0]][-1]
            if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
                k = shapes[node.input[0]][0]
            total += int(np.prod(out[1:] if len(out) > 2 else out[-1:])) * k
    return total


def weight_files(proto: onnx.ModelProto, path: Path) -> list[Path]:
    """The external weight files the graph's initializers name (``model.onnx.data`` and such)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    names = {ExternalDataInfo(t).location for t in proto.graph.initializer if uses_external_data(t)}
    return [path.parent / name for name in sorted(names)]


# ---------------------------------------------------------------- external weights


def data_file(path: str | os.PathLike) -> Path:
    """Where the weights of ``path`` go when they are external: ``model.onnx`` -> ``model.onnx.data``."""
    path = Path(path)
    return path.with_name(path.name + DATA_SUFFIX)


def too_large(model: onnx.ModelProto) -> bool:
    """Whether ``model`` cannot be serialized as one protobuf message."""
    from google.protobuf.message import EncodeError

    try:
        return model.ByteSize() > PROTOBUF_LIMIT
    except EncodeError:  # protobuf's upb backend will not even size a message over its limit
        return True


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, external: bool) -> Path:
    """Write ``model`` to ``path``, its weights to :func:`data_file` when ``external``; ``model`` is unchanged."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    path = Path(path)
    if not external:
        onnx.save_model(model, str(path))
        return path
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_file(path).name, size_threshold=1024)
    os.chmod(data_file(path), path.stat().st_mode & 0o777)  # onnx creates it 0600; it belongs with the graph
    load_external_data_for_model(model, str(path.parent))
    return path


def open_proto(model: onnx.ModelProto, opener: Callable[[bytes | str], T]) -> T:
    """``opener(source)``, ``source`` being the serialized model or, above the limit, the path of a temporary
    copy with external weights that lives as long as what it opened."""
    if not too_large(model):
        return opener(model.SerializeToString())
    folder = tempfile.TemporaryDirectory(prefix="repconv-large-")
    try:
        opened = opener(str(save_onnx(model, Path(folder.name) / "model.onnx", external=True)))
    except BaseException:
        folder.cleanup()
        raise
    weakref.finalize(opened, folder.cleanup)
    return opened


# ---------------------------------------------------------------- ONNX Runtime


def ort_providers(device: str = "cpu", providers: Sequence[str] | None = None) -> list[str]:
    """A session's execution providers: ``providers`` as given (each one available in this onnxruntime), else
    ``device``'s (cpu: the CPU provider; cuda: CUDA, then CPU for what CUDA does not run)."""
    import onnxruntime as ort

    if providers is not None:
        if not providers:
            raise OptionError("providers", list(providers), "names no execution provider",
                              "give e.g. ['CPUExecutionProvider'], or leave it out to follow the device")
        available = ort.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise DependencyError(f"this onnxruntime has no {', '.join(missing)} (available: {', '.join(available)})",
                                  "install onnxruntime-gpu (and TensorRT for its provider) on a machine with an "
                                  "NVIDIA GPU, or use the CPU provider")
        return list(providers)
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DependencyError("ONNX Runtime has no CUDA provider here",
                                  "pip install 'repconv[gpu]' (onnxruntime-gpu) on a machine with an NVIDIA GPU, "
                                  "or use the cpu device")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_session(model: onnx.ModelProto | str | os.PathLike, level: str = "all", *, threads: int | None = None,
                device: str = "cpu", spinning: Spinning = "off", providers: Sequence[str] | None = None):
    """An ONNX Runtime session on a graph (in memory, or a file) at optimization ``level``.

    ``threads`` defaults to torch's thread count. ``spinning``: ``off`` (default), worker threads never spin: a
    session kept alive while torch works in the same process would otherwise take CPU from it; ``on``, ONNX
    Runtime's default, for bench's one session at a time; ``in-runs``, they spin within each run and stop when it
    returns (``session.force_spinning_stop``), for sessions timed in turn in one process, which otherwise take the
    cores from each other (on a 2-core host, a model timed against a copy of itself measured 1.0-1.8x with idle
    sessions spinning, 0.97-1.01x without).
    ``providers`` (execution providers in priority order, e.g. ``["TensorrtExecutionProvider"]`` for the
    search's tensorrt target) replaces ``device``'s (:func:`ort_providers`).
    """
    import onnxruntime as ort

    if threads is None:
        import torch

        threads = torch.get_num_threads()
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if spinning not in typing.get_args(Spinning):
        raise OptionError("spinning", spinning, "is not a known choice", "use off, in-runs or on")
    if spinning == "off":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    elif spinning == "in-runs":
        options.add_session_config_entry("session.force_spinning_stop", "1")
    providers = ort_providers(device, providers)

    def session(source):
        try:
            return ort.InferenceSession(source, options, providers=providers)
        except Exception as exc:  # onnxruntime's own Fail / InvalidGraph types
            name = source if isinstance(source, str) else "the graph"
            first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            gpu = [p for p in providers if p != "CPUExecutionProvider"]
            fix = "re-export it with an opset this onnxruntime supports"
            if gpu:  # the provider's own libraries fail at session creation too: name both causes
                fix += f", or check the libraries that {', '.join(gpu)} needs (CUDA, cuDNN, TensorRT)"
            raise InputFileError(f"ONNX Runtime cannot load '{name}': {first}", fix) from exc

    if isinstance(model, (str, os.PathLike)):
        return session(str(model))
    return open_proto(model, session)


def run_onnx(session, x: np.ndarray | torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Logits of an ONNX Runtime session (input ``input``, output ``logits``) over ``x`` in chunks."""
    x = _numpy(x).astype(np.float32, copy=False) if not isinstance(x, np.ndarray) else x
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + batch_size]})[0]
                           for i in range(0, len(x), batch_size)])


def max_ort_opset() -> int:
    """The newest default-domain opset the installed onnxruntime loads (probed with a one-node model)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    for version in range(onnx.defs.onnx_opset_version(), 6, -1):
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", version)], ir_version=8)
        try:
            ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
            return version
        except Exception:  # onnxruntime raises its own Fail type for an unsupported opset
            continue
    raise DependencyError("the installed onnxruntime loads no ONNX opset", "reinstall onnxruntime")
