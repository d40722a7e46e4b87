"""Running artifacts: one Session over PyTorch, ONNX Runtime and TensorRT; predict; bench."""

from repconv.runtime.session import Session, open_session

__all__ = ["Session", "open_session"]
