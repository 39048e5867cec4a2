"""Macroblock Scaling for ONNX CNNs."""
