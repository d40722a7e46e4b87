"""Running artifacts: one Session over PyTorch, ONNX Runtime and TensorRT; predict; validate; bench."""

from repconv.runtime.base import Session
from repconv.runtime.session import open_session

__all__ = ["Session", "open_session"]
