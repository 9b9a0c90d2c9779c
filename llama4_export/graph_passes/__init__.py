"""Stage 3: ONNX graph passes — canonicalize, fuse (MoE routing → Llama4MoE, RMSNorm, RoPE), lower for a target.

    model, report = optimize("decode.onnx", target="onnxruntime", verify=True)
    manifest, reports = optimize_artifact("out/scout-tiny-fp32", target="onnxruntime")

moe_reference.py defines the fused MoE op's semantics (numpy); ops.py its ONNX signature; trt_plugin_spec.py the
TensorRT plugin node the tensorrt lowering writes.
"""

from .artifact_passes import PASSES_FILE, optimize_artifact
from .errors import GraphPassError
from .manager import GraphPass, PassContext, PassRecord, PassReport, op_histogram, run_passes
from .pipeline import TARGETS, default_target, optimize, passes_for

__all__ = [
    "PASSES_FILE", "TARGETS", "GraphPass", "GraphPassError", "PassContext", "PassRecord", "PassReport",
    "default_target", "op_histogram", "optimize", "optimize_artifact", "passes_for", "run_passes",
]
