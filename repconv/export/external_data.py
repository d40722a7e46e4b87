"""ONNX files whose weights live in a side file: the only form protobuf allows above 2 GiB.

The layout is the one onnx, ONNX Runtime and TensorRT's parser read: ``model.onnx`` holds the graph and
names ``model.onnx.data`` (beside it) for every initializer above 1 KiB. ``onnx.save_model`` moves an
in-memory graph's weights out while writing; `save_onnx` puts them back, so a caller can keep using it.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import onnx
from google.protobuf.message import EncodeError
from onnx.external_data_helper import load_external_data_for_model

PROTOBUF_LIMIT = 2**31 - 1
SUFFIX = ".data"
T = TypeVar("T")


def data_file(path: str | os.PathLike) -> Path:
    """Where the weights of ``path`` go when they are external: ``model.onnx`` -> ``model.onnx.data``."""
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


def too_large(model: onnx.ModelProto) -> bool:
    """Whether ``model`` cannot be serialized as one protobuf message."""
    try:
        return model.ByteSize() > PROTOBUF_LIMIT
    except EncodeError:  # protobuf's upb backend will not even size a message over its limit
        return True


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, external: bool) -> Path:
    """Write ``model`` to ``path``, its weights to :func:`data_file` when ``external``; ``model`` is unchanged."""
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
    """``opener(source)`` (an ONNX Runtime session, say), ``source`` being the serialized model or, above
    the limit, the path of a temporary copy with external weights that lives as long as what it opened."""
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
