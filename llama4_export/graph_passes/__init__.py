"""Stage 3: ONNX graph passes (canonicalize, fuse, quantize, lower). moe_reference defines the fused MoE op."""
