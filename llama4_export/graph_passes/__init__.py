"""Stage 4: ONNX graph passes — canonicalize, fuse (MoE routing → Llama4MoE, RMSNorm, RoPE), quantize, lower for a
target. pipeline.py runs them on one graph (`optimize`); artifact_passes.py on every graph of an artifact with the
weights left on disk (`optimize_graphs`, `optimize_artifact`). moe_reference.py defines the fused MoE op's semantics
(numpy); ops.py its ONNX signature; trt_plugin_spec.py the TensorRT plugin node the tensorrt lowering writes.

Import what you need from the submodules: this package file imports nothing, so the runtime and the TensorRT
tooling can read trt_plugin_spec without loading the exporter.
"""
