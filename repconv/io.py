"""Files: writing atomically (with the mode a plain write would give), and recognising model files by content."""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from repconv.errors import OutputError


def check_output_path(target: str | os.PathLike) -> Path:
    """Raise OutputError now if ``target`` could not be written (missing or read-only folder, a folder)."""
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise OutputError(f"cannot write '{target}': it is a folder", "give a file name")
    if not folder.is_dir():
        raise OutputError(f"cannot write '{target}': folder '{folder}' does not exist", "create it first")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write '{target}': folder '{folder}' is not writable",
                          "choose another output path")
    try:  # the only sure test: /proc, read-only mounts and full disks pass the checks above
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise OutputError(f"cannot write '{target}' ({exc.strerror})", "choose another output path") from exc
    return target


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    The file gets the mode ``open(target, "w")`` would give it, set after the block, so that writers
    which create the file anew (safetensors' ``save_file``) cannot leave mkstemp's 0600 behind.
    """
    target = check_output_path(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as exc:  # /proc, a full disk, a folder that only looks writable
        raise OutputError(f"cannot write '{target}' ({exc.strerror})", "choose another output path") from exc
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, file_mode(target))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def file_mode(target: Path) -> int:
    """The mode ``open(target, "w")`` would give: the existing file's, else 0666 less the umask."""
    with contextlib.suppress(FileNotFoundError):
        return target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return Path(target)


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


# ---------------------------------------------------------------- what a file is, by its content

FileKind = Literal["safetensors", "torch-zip", "torchscript", "pickle", "onnx", "engine", "empty", "unknown"]
ENGINE_SIDECAR_SUFFIX = ".json"  # model.engine -> model.engine.json (written by repconv's engine build)


def sniff(path: str | os.PathLike) -> FileKind:
    """Recognise a model file by its bytes, never by its suffix.

    safetensors: an 8-byte little-endian header length, then a JSON object; ``torch.save``: a zip archive
    (TorchScript when it holds ``code/`` or ``constants.pkl``) or a pickle stream (``0x80``); ONNX: a protobuf
    ``ModelProto`` opening with its ``ir_version`` field (tag ``0x08``); a TensorRT engine: repconv's JSON
    sidecar beside it (engines have no public magic number).
    """
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"  # (a truncated one too: its reader then says so)
    if head[:4] == b"PK\x03\x04":
        return "torchscript" if _is_torchscript(path) else "torch-zip"
    if head[:1] == b"\x80":
        return "pickle"
    if _has_engine_sidecar(path):
        return "engine"
    if head[:1] == b"\x08":
        return "onnx"
    return "unknown"


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


def _has_engine_sidecar(path: Path) -> bool:
    sidecar = path.with_name(path.name + ENGINE_SIDECAR_SUFFIX)
    if not sidecar.is_file():
        return False
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return '"repconv-tensorrt-engine"' in sidecar.read_text()[:20000]
    return False


ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def artifact_backend(path: str | os.PathLike) -> Literal["torch", "ort", "trt"]:
    """Which backend runs the file, by its content. Content nothing recognises goes by its suffix, only so
    that the reader of that kind can say what is wrong with it (a ``.onnx`` of garbage: "not a readable
    ONNX file"; an ``.engine`` without repconv's sidecar: which file is missing)."""
    kind = sniff(path)
    suffix = Path(path).suffix.lower()
    if kind == "onnx" or (kind == "unknown" and suffix == ".onnx"):
        return "ort"
    if kind == "engine" or (kind == "unknown" and suffix in ENGINE_SUFFIXES):
        return "trt"
    return "torch"
