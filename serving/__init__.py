"""convserve serving: the gRPC inference server on ONNX Runtime (never imports torch)."""

__version__ = "0.1.0"
