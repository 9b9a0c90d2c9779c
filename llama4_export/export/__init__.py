"""Stage 2: torch.export → ONNX graphs with an explicit KV cache (see io_spec for the interface)."""
