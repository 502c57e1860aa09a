"""Benchmarks (not tests): the CPU suite (cpu.py), the GPU benchmark (gpu.py), PyTorch vs onnxruntime (onnx.py)."""
