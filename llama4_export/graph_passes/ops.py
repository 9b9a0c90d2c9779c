"""Our own ONNX operators: the canonical fused MoE node the fusion passes produce and the lowerings consume.

`ai.llama4export::Llama4MoE` (opset 1) — one Llama 4 MoE layer: top-1 sigmoid routing that scales the routed
expert's *input*, a SwiGLU expert, plus the shared expert. Semantics: moe_reference.llama4_moe.

  inputs   x            float [N, H]       tokens
           router       float [E, H]       router.weight (nn.Linear layout)
           gate_up      float [E, H, 2I]   experts.gate_up_proj (checkpoint layout: x @ W, gate = first I columns)
           down         float [E, I, H]    experts.down_proj
           shared_gate  float [I, H]       shared_expert.gate_proj.weight (nn.Linear layout)
           shared_up    float [I, H]       shared_expert.up_proj.weight
           shared_down  float [H, I]       shared_expert.down_proj.weight
  output   y            float [N, H]
  attributes num_experts (int, = E), top_k (int, 1), activation (string, "swiglu")

The weights stay the checkpoint's initializers (same names, same layout), so decode and prefill keep sharing one
external-data file and the quantization passes find them by name. No runtime executes this op: a lowering replaces it
(lower.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

DOMAIN = "ai.llama4export"
DOMAIN_VERSION = 1
MOE_OP = "Llama4MoE"
MOE_INPUTS = ("x", "router", "gate_up", "down", "shared_gate", "shared_up", "shared_down")
MOE_TOP_K = 1
MOE_ACTIVATION = "swiglu"


def moe_node_model(weights: dict[str, np.ndarray], tokens: int | None = None) -> ir.Model:
    """A model holding one Llama4MoE node: input x [tokens, H] (symbolic when None), the weights as initializers.

    `weights` maps MOE_INPUTS[1:] to arrays in checkpoint layout. For probing a lowering and for tests."""
    experts, hidden = weights["router"].shape
    dtype = ir.DataType.from_numpy(weights["router"].dtype)
    x = ir.Value(name="x", type=ir.TensorType(dtype), shape=ir.Shape([tokens if tokens else "tokens", hidden]))
    initializers = [
        ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(weights[name].shape),
                 const_value=ir.tensor(weights[name], name=name))
        for name in MOE_INPUTS[1:]
    ]
    node = ir.Node(
        DOMAIN, MOE_OP, [x, *initializers], version=DOMAIN_VERSION, num_outputs=1,
        attributes=[ir.AttrInt64("num_experts", experts), ir.AttrInt64("top_k", MOE_TOP_K),
                    ir.AttrString("activation", MOE_ACTIVATION)],
    )
    y = node.outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(dtype), ir.Shape(x.shape)
    graph = ir.Graph([x], [y], nodes=[node], initializers=initializers, opset_imports={"": 21, DOMAIN: DOMAIN_VERSION},
                     name="llama4_moe")
    return ir.Model(graph, ir_version=10)
