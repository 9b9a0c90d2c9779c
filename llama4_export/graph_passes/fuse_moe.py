"""MoE-routing fusion: the traced Llama 4 MoE layer → one `ai.llama4export::Llama4MoE` node (ops.py).

The exporter traces the layer in one of two forms (model/modeling.py MoE), and each gets a rule:

  gather (decode)  logits = x @ router.T; e = ArgMax(logits); s = Sigmoid(ReduceMax(logits)); xs = x * s
                   routed = SwiGLU(xs @ GatherND(gate_up, e)) @ GatherND(down, e)
  dense (prefill)  the same routing; onehot = Cast(Equal(e, arange(E))); xe = onehot.T[:, :, None] * xs[None]
                   routed = ReduceSum(SwiGLU(xe @ gate_up) @ down, axis 0)      — every expert on every token
                   (fp16/bf16 traces: Cast(ReduceSum(Cast(…, to=FLOAT)), to=x.dtype), torch's fp32 accumulation)
  both             out = SwiGLU-MLP(x; shared_gate, shared_up, shared_down) + routed
  score, either    s = Sigmoid(top)                                   (fp32 traces)
                   s = Cast(Sigmoid(Cast(top, to=FLOAT)), to=x.dtype) (fp16/bf16 traces: the sigmoid runs in fp32)

→ Llama4MoE(x, router, gate_up, down, shared_gate, shared_up, shared_down; num_experts=E, top_k=1, activation=swiglu)

The checks verify the math, not names: the linear layers are exact x @ W.T Gemms, ArgMax/ReduceMax run over the
expert axis with first-index ties, the Split halves gate_up into [gate | up], every weight has the shape its role
implies, and the dense form's one-hot compares against exactly arange(E). The fused op computes the score in at
least fp32 whatever x's type (moe_reference, the plugin's kernels), so both score forms map to it.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from . import ops
from .canonicalize import CANONICAL
from ._match import attr, const_equals, dims, is_linear, is_weight, last_axis
from .manager import GraphPass, PassContext

MOE_FUSED = "moe_fused"


def _swiglu(op, gate, up):
    return op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)


def _routing(op, x, router):
    logits = op.Gemm(x, router, _outputs=["logits"])
    index = op.ArgMax(logits, _outputs=["index"])
    top = op.ReduceMax(logits, _allow_other_inputs=True, _outputs=["top"])
    in_fp32 = op.Cast(op.Sigmoid(op.Cast(top, _outputs=["upcast"])), _outputs=["downcast"])
    sigmoid = pattern.OrValue([op.Sigmoid(top), in_fp32])
    routed_in = op.Mul(x, op.Unsqueeze(sigmoid, _allow_other_inputs=True, _outputs=["score"]))
    return index, routed_in


def _shared_expert(op, x, shared_gate, shared_up, shared_down):
    gate = op.Gemm(x, shared_gate, _outputs=["shared_gate_out"])
    up = op.Gemm(x, shared_up, _outputs=["shared_up_out"])
    return op.Gemm(_swiglu(op, gate, up), shared_down, _outputs=["shared_out"])


def gather_form(op, x, router, gate_up, down, shared_gate, shared_up, shared_down, select_a, select_b):
    index, routed_in = _routing(op, x, router)
    expert = op.Unsqueeze(index, _allow_other_inputs=True, _outputs=["expert"])
    gate_up_out = op.Gather(op.MatMul(op.Unsqueeze(routed_in, _allow_other_inputs=True), op.GatherND(gate_up, expert)),
                            select_a, axis=1)
    gate, up = op.Split(gate_up_out, _outputs=["gate", "up"])
    hidden = _swiglu(op, gate, up)
    routed = op.Gather(op.MatMul(op.Unsqueeze(hidden, _allow_other_inputs=True), op.GatherND(down, expert)), select_b, axis=1)
    return op.Add(_shared_expert(op, x, shared_gate, shared_up, shared_down), routed)


def dense_form(op, x, router, gate_up, down, shared_gate, shared_up, shared_down, expert_ids):
    index, routed_in = _routing(op, x, router)
    onehot = op.Cast(op.Cast(op.Equal(op.Unsqueeze(index, _allow_other_inputs=True), expert_ids)), _outputs=["onehot"])
    expert_mask = op.Unsqueeze(op.Transpose(onehot, perm=[1, 0]), _allow_other_inputs=True)
    expert_in = op.Mul(expert_mask, op.Unsqueeze(routed_in, _allow_other_inputs=True))
    gate, up = op.Split(op.MatMul(expert_in, gate_up), _outputs=["gate", "up"])
    per_expert = op.MatMul(_swiglu(op, gate, up), down)
    summed = pattern.OrValue([
        op.ReduceSum(per_expert, _allow_other_inputs=True, _outputs=["routed"]),
        op.Cast(op.ReduceSum(op.Cast(per_expert, _outputs=["sum_upcast"]), _allow_other_inputs=True, _outputs=["routed"]),
                _outputs=["sum_downcast"]),
    ])
    return op.Add(_shared_expert(op, x, shared_gate, shared_up, shared_down), summed)


def _check_common(x, router, gate_up, down, shared_gate, shared_up, shared_down, logits, index, top, gate,
                  shared_gate_out, shared_up_out, shared_out, upcast=None, downcast=None, **_) -> bool:
    x_dims, e_dims = dims(x), dims(gate_up)
    if x_dims is None or len(x_dims) != 2 or e_dims is None or None in e_dims:
        return False
    if upcast is not None and not (attr(upcast, "to") == ir.DataType.FLOAT and attr(downcast, "to") == x.dtype):
        return False
    experts, hidden, two_inter = e_dims
    shared_inter = shared_gate.shape[0] if is_weight(shared_gate, 2) else None
    return (
        all(is_linear(v) for v in (logits, shared_gate_out, shared_up_out, shared_out))
        and is_weight(router, 2) and list(router.shape) == [experts, hidden]
        and is_weight(gate_up, 3) and is_weight(down, 3) and list(down.shape) == [experts, two_inter // 2, hidden]
        and shared_inter is not None and list(shared_gate.shape) == [shared_inter, hidden]
        and is_weight(shared_up, 2) and list(shared_up.shape) == [shared_inter, hidden]
        and is_weight(shared_down, 2) and list(shared_down.shape) == [hidden, shared_inter]
        and last_axis(logits, attr(index, "axis", 0)) and attr(index, "keepdims", 1) == 0
        and attr(index, "select_last_index", 0) == 0
        and last_axis(logits, top.producer().inputs[1]) and attr(top, "keepdims", 1) == 0
        and _halves(gate, two_inter)
    )


def _halves(gate: ir.Value, two_inter: int) -> bool:
    """The Split producing gate/up cuts the last axis into two equal halves [gate | up]."""
    split = gate.producer()
    source = split.inputs[0]
    sizes = split.inputs[1] if len(split.inputs) > 1 else None
    halves = attr(gate, "num_outputs") == 2 if sizes is None else const_equals(sizes, [two_inter // 2] * 2)
    return len(split.outputs) == 2 and halves and last_axis(source, attr(gate, "axis", 0))


def check_gather(context, select_a, select_b, score, expert, **bindings) -> bool:
    """Both Gathers take element 0 of axis 1 ([N, 1, K] → [N, K]); the Unsqueezes add exactly those axes."""
    return (
        _check_common(**bindings)
        and const_equals(select_a, 0) and const_equals(select_b, 0)
        and _unsqueezes(score, [1]) and _unsqueezes(expert, [-1], [1])
    )


def check_dense(context, expert_ids, onehot, score, routed, sum_upcast=None, sum_downcast=None, **bindings) -> bool:
    """The one-hot compares the expert index against arange(E), in x's float type; the sum runs over experts (in fp32
    when the trace upcasts it: exact either way, as one term per token is non-zero)."""
    experts = bindings["gate_up"].shape[0] if is_weight(bindings["gate_up"], 3) else None
    upcast_ok = sum_upcast is None or (attr(sum_upcast, "to") == ir.DataType.FLOAT
                                       and attr(sum_downcast, "to") == bindings["x"].dtype)
    return (
        _check_common(**bindings) and experts is not None and upcast_ok
        and const_equals(expert_ids, list(range(experts)))
        and onehot.dtype == bindings["x"].dtype
        and _unsqueezes(score, [1])
        and const_equals(routed.producer().inputs[1], [0]) and attr(routed, "keepdims", 1) == 0
    )


def _unsqueezes(value: ir.Value, *accepted: list[int]) -> bool:
    return any(const_equals(value.producer().inputs[1], axes) for axes in accepted)


def fused_moe(op, x, router, gate_up, down, shared_gate, shared_up, shared_down, **_):
    return op.op(
        ops.MOE_OP, x, router, gate_up, down, shared_gate, shared_up, shared_down,
        _domain=ops.DOMAIN, _version=ops.DOMAIN_VERSION,
        num_experts=gate_up.shape[0], top_k=ops.MOE_TOP_K, activation=ops.MOE_ACTIVATION,
    )


MOE_GATHER_RULE = pattern.RewriteRule(gather_form, fused_moe, check_gather, name="moe_gather_form")
MOE_DENSE_RULE = pattern.RewriteRule(dense_form, fused_moe, check_dense, name="moe_dense_form")


def fuse_moe_gather(model: ir.Model, context: PassContext) -> int:
    """router Gemm → ArgMax/ReduceMax → Sigmoid → x·s → GatherND(expert weights) SwiGLU + shared SwiGLU → Llama4MoE"""
    return pattern.RewriteRuleSet([MOE_GATHER_RULE]).apply_to_model(model)


def fuse_moe_dense(model: ir.Model, context: PassContext) -> int:
    """router Gemm → ArgMax/ReduceMax → Sigmoid → one-hot(E)·x·s → all-expert SwiGLU → ReduceSum + shared → Llama4MoE"""
    return pattern.RewriteRuleSet([MOE_DENSE_RULE]).apply_to_model(model)


def moe_fusion_passes() -> list[GraphPass]:
    return [
        GraphPass("fuse_moe_gather", fuse_moe_gather, requires=(CANONICAL,), produces=(MOE_FUSED,)),
        GraphPass("fuse_moe_dense", fuse_moe_dense, requires=(CANONICAL,), produces=(MOE_FUSED,)),
    ]
