"""Stage 5: TensorRT engines from a tensorrt-lowered artifact (needs TensorRT and a GPU)."""
