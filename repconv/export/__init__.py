"""Export: verified ONNX (fp32 / fp16 / int8) from a plain (folded) module; TensorRT engines."""
