"""Stage 6: the Generator — a backend (ONNX Runtime, TensorRT), the sliding KV cache, sampling and the tokenizer."""
