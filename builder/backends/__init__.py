"""Backends that compile layer programs beyond torch: ONNX export, TensorRT and TensorRT-RTX engines."""
