"""convserve serving: the gRPC inference server on ONNX Runtime (never imports torch)."""
