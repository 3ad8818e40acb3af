"""convserve trainer: datasets, CNNs, the training loop, ONNX export and reports."""

__version__ = "0.1.0"
