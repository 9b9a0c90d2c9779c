"""Stage 9: evaluation — the accuracy report of an artifact against its source's PyTorch model (report.py), graph
comparisons ONNX Runtime vs TensorRT or PyTorch (compare.py), speed and memory benchmarks (bench.py), and the PyTorch
reference as a runtime backend (torch_backend.py)."""
