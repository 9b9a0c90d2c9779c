"""The TensorRT plugin that runs the Llama 4 MoE layer: the one place its name, namespace, version and fields live.

The tensorrt lowering writes an ONNX node with op_type PLUGIN_NAME in PLUGIN_DOMAIN. TensorRT's ONNX parser treats a
node it does not know as a plugin: it looks up a creator registered under (op_type, `plugin_version` attribute,
`plugin_namespace` attribute) and hands every other attribute over as a plugin field. The TensorRT stage registers
its plugin (the Triton kernels in llama4_export/kernels) with exactly these values — import them from here.

Inputs (in order) and semantics are those of the canonical op ai.llama4export::Llama4MoE (ops.py): x [N, H] and the
six weights in checkpoint layout; one output [N, H] with x's dtype.
"""

from __future__ import annotations

from .ops import MOE_INPUTS

PLUGIN_NAME = "Llama4MoEPlugin"
PLUGIN_NAMESPACE = "llama4_export"
PLUGIN_VERSION = "1"
# The ONNX domain of the node. TensorRT ignores it (it matches op_type + plugin_version + plugin_namespace);
# ONNX Runtime needs a domain of its own for the node to load with a custom-op implementation.
PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_INPUTS = MOE_INPUTS
# Plugin fields (ONNX attributes) and their types: ints are INT32 fields, strings CHAR fields.
PLUGIN_FIELDS = {"num_experts": int, "top_k": int, "activation": str}
