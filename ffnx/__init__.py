"""ffnx: deploy FFN-variant PyTorch models to ONNX Runtime and TensorRT."""

__version__ = "0.1.0"
