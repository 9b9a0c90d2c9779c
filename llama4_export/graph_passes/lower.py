"""Lowering of the canonical Llama4MoE node for a target (the canonical op is not executable by itself).

onnxruntime, up to IF_PER_EXPERT_MAX experts (Scout's 16), INT4 or float32
  one `If` per expert, taken only when some token chose that expert: its branch gathers those tokens, runs the expert
  as two linears over its own weights (initializers of the main graph, which ONNX Runtime prepacks one subgraph level
  down) and scatter-adds the result into the shared expert's output. INT4 experts (quantize.quantize_experts'
  Transpose ∘ DequantizeLinear form) run as two com.microsoft.MatMulNBits (the linears' accuracy level): decode reads
  one expert's 4-bit weights per token and no expert is ever dequantized to fp32. Float32 experts run as two MatMuls
  over the expert's slice (checkpoint layout [K, N] is MatMul's). A batch or a prefill runs each chosen expert once on
  its tokens. Against the fused nodes below (benchmarks/moe_lowering.py, rand200m's expert shape, 8 experts, 2
  threads): QMoE costs 1.6–1.8× the Ifs at one token, 4.9× at 8, 2.8× at 64 — its CPU kernel (onnxruntime 1.32)
  dequantizes the chosen expert per token; com.microsoft.MoE costs 1.35× at one token, 1.5× at 8, 1.5–2.0× at
  64–256. Every If costs ≈ 1–5 µs even when not taken, which is why more experts keep the fused nodes. (A tree of Ifs
  would need each expert's weights declared inside its branch — ONNX Runtime prepacks a weight only one subgraph
  level below its declaration — and ONNX Runtime 1.32 then keeps a second copy of every expert in memory.)
onnxruntime, more experts (Maverick's 128)
  INT4: one com.microsoft.QMoE node (k = 1, interleaved SwiGLU), when this onnxruntime's matches the reference.
  Float32: `com.microsoft.MoE` — used only when it matches moe_reference on the installed onnxruntime
  (`ort_moe_problem` builds a one-node graph with this very lowering and compares). The k=1 mapping (DESIGN.md §5):
  the MoE op takes x·sigmoid(max logit) as its input and the raw logits as router_probs; with k=1 and
  normalize_routing_weights=1 the softmax weight of the one selected expert is exactly 1, so the op computes
  expert_e(x·s) — Llama 4's input scaling — and selects e = argmax(logits). Its CPU kernel (onnxruntime 1.32) accepts
  only the interleaved fused SwiGLU layout (swiglu_fusion=1: fc1 rows g0,u0,g1,u1,…, [E, 2I, H]) and computes
  gate·sigmoid(α·gate)·(up + β): α=1, β=0 and no swiglu_limit give silu(gate)·up exactly (gpt-oss uses α=1.702, β=1
  and a clamp: we set ours). The expert weights are re-laid out into new initializers (`<name>.ort_moe_fc1` /
  `.ort_moe_fc2`). Otherwise the standard-op lowering below.
standard ops (ONNX Runtime fallback; TensorRT behind --trt-fallback)
  gather — Gather(gate_up, e) / Gather(down, e): each token reads only its expert's weights (decode graphs);
  dense  — every expert on one-hot-scaled inputs (prefill graphs: no per-token weight copies; E× the arithmetic).
tensorrt
  a `Llama4MoEPlugin` node (trt_plugin_spec.py) with the Llama4MoE inputs: TensorRT runs it through our plugin.
The shared expert is always three plain Gemms (a dense MLP every target runs well).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnxscript.rewriter import pattern

from . import ops, trt_plugin_spec
from .errors import GraphPassError
from .manager import GraphPass, PassContext
from .fuse_moe import MOE_FUSED
from .moe_reference import llama4_moe
from .ort_run import run_onnxruntime
from .lower_linears import ACCURACY_LEVEL, nbits_weight
from .quantize import initializer, int4_blockwise, int4_dequantize, leading_slice

MOE_LOWERED = "moe_lowered"
INT4_EXPERTS_LOWERING = "If + MatMulNBits per expert (INT4 experts)"  # the manifest's moe_lowering
FLOAT_EXPERTS_LOWERING = "If + MatMul per expert (float32 experts)"
QMOE_LOWERING = "QMoE (INT4 experts)"
# One If per expert costs ≈ 2.5–5 µs per call even when not taken (benchmarks/moe_lowering.py): beyond this many
# experts a decode step pays more for the Ifs than the fused nodes cost (QMoE's dequantizing kernel, the float MoE op),
# so many-expert models (Maverick's 128) keep them.
IF_PER_EXPERT_MAX = 16
INT4_ZERO_POINT = 8  # QMoE's and MatMulNBits' implicit zero point: nibble = q + 8
ORT_DOMAIN = "com.microsoft"


def _moe_node(op, x, router, gate_up, down, shared_gate, shared_up, shared_down):
    return getattr(op, ops.MOE_OP)(x, router, gate_up, down, shared_gate, shared_up, shared_down, _domain=ops.DOMAIN)


def _any_moe(context, **_) -> bool:
    return True


def _ort_moe_applies(context, x, gate_up, down, **_) -> bool:
    """float32 (what the probe checked) and the expert weights are initializers (this lowering re-lays them out)."""
    return x.dtype == ir.DataType.FLOAT and gate_up.const_value is not None and down.const_value is not None


def _swiglu(op, gate, up):
    return op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)


def _routing(op, x, router):
    """(logits [N, E], x · sigmoid(max logit) [N, H])."""
    logits = op.Gemm(x, router, transB=1)
    score = op.Sigmoid(op.ReduceMax(logits, op.Constant(value_ints=[-1]), keepdims=1))
    return logits, op.Mul(x, score)


def _shared_expert(op, x, shared_gate, shared_up, shared_down):
    return op.Gemm(_swiglu(op, op.Gemm(x, shared_gate, transB=1), op.Gemm(x, shared_up, transB=1)), shared_down, transB=1)


def ort_moe(op, x, router, gate_up, down, shared_gate, shared_up, shared_down, **_):
    """Llama4MoE → com.microsoft.MoE(x·s, logits, k=1, interleaved SwiGLU) + shared expert"""
    logits, routed_in = _routing(op, x, router)
    experts, _, two_inter = gate_up.shape
    fc1 = gate_up.const_value.numpy().transpose(0, 2, 1)  # [E, 2I, H]: gate rows, then up rows
    fc1 = np.stack([fc1[:, : two_inter // 2], fc1[:, two_inter // 2 :]], axis=2).reshape(fc1.shape)  # g0,u0,g1,u1,…
    fc2 = down.const_value.numpy().transpose(0, 2, 1)  # [E, H, I]
    routed = op.op(
        "MoE", routed_in, logits,
        op.initializer(ir.tensor(np.ascontiguousarray(fc1)), name=f"{gate_up.name}.ort_moe_fc1"), None,
        op.initializer(ir.tensor(np.ascontiguousarray(fc2)), name=f"{down.name}.ort_moe_fc2"),
        _domain=ORT_DOMAIN, _version=1, k=1, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
        activation_beta=0.0, normalize_routing_weights=1,
    )
    return op.Add(_shared_expert(op, x, shared_gate, shared_up, shared_down), routed)


def _int4_experts(weight: ir.Value) -> ir.Node | None:
    """The DequantizeLinear of quantize.quantize_experts' INT4 form (Transpose ∘ DQ(int4 [E, N, K], axis 2)), or None."""
    transpose = weight.producer()
    if transpose is None or transpose.op_type != "Transpose":
        return None
    dequantize = transpose.inputs[0].producer()
    if dequantize is None or dequantize.op_type != "DequantizeLinear" or dequantize.inputs[0].const_value is None:
        return None
    return dequantize if dequantize.inputs[0].dtype == ir.DataType.INT4 else None


def gather_moe(op, x, router, gate_up, down, shared_gate, shared_up, shared_down, **_):
    """Llama4MoE → ArgMax; Gather(gate_up, e), Gather(down, e) per token; SwiGLU; + shared expert"""
    logits, routed_in = _routing(op, x, router)
    expert = op.ArgMax(logits, axis=-1, keepdims=0)  # [N]; first index on ties, as the reference
    gate, up = op.Split(op.MatMul(op.Unsqueeze(routed_in, op.Constant(value_ints=[1])), op.Gather(gate_up, expert, axis=0)),
                        axis=-1, num_outputs=2, _outputs=2)
    routed = op.MatMul(_swiglu(op, gate, up), op.Gather(down, expert, axis=0))  # [N, 1, H]
    return op.Add(_shared_expert(op, x, shared_gate, shared_up, shared_down), op.Squeeze(routed, op.Constant(value_ints=[1])))


def dense_moe(op, x, router, gate_up, down, shared_gate, shared_up, shared_down, **_):
    """Llama4MoE → every expert on one-hot(e)-masked x·s, summed over experts; + shared expert"""
    logits, routed_in = _routing(op, x, router)
    expert = op.ArgMax(logits, axis=-1, keepdims=1)  # [N, 1]
    experts = gate_up.shape[0]
    onehot = op.Cast(op.Equal(expert, op.Constant(value_ints=list(range(experts)))), to=x.dtype or ir.DataType.FLOAT)  # [N, E]
    mask = op.Unsqueeze(op.Transpose(onehot, perm=[1, 0]), op.Constant(value_ints=[2]))  # [E, N, 1]
    expert_in = op.Mul(mask, op.Unsqueeze(routed_in, op.Constant(value_ints=[0])))  # [E, N, H]
    gate, up = op.Split(op.MatMul(expert_in, gate_up), axis=-1, num_outputs=2, _outputs=2)
    routed = op.ReduceSum(op.MatMul(_swiglu(op, gate, up), down), op.Constant(value_ints=[0]), keepdims=0)
    return op.Add(_shared_expert(op, x, shared_gate, shared_up, shared_down), routed)


def trt_plugin_moe(op, x, router, gate_up, down, shared_gate, shared_up, shared_down, **_):
    """Llama4MoE → Llama4MoEPlugin (same inputs, plugin_version / plugin_namespace attributes for TensorRT)"""
    return op.op(
        trt_plugin_spec.PLUGIN_NAME, x, router, gate_up, down, shared_gate, shared_up, shared_down,
        _domain=trt_plugin_spec.PLUGIN_DOMAIN, _version=1, num_experts=gate_up.shape[0], top_k=ops.MOE_TOP_K,
        activation=ops.MOE_ACTIVATION, plugin_version=trt_plugin_spec.PLUGIN_VERSION,
        plugin_namespace=trt_plugin_spec.PLUGIN_NAMESPACE,
    )


LOWERINGS = {"ort_moe": ort_moe, "gather": gather_moe, "dense": dense_moe, "trt_plugin": trt_plugin_moe}


def _lower(model: ir.Model, lowering: str) -> int:
    check = _ort_moe_applies if lowering == "ort_moe" else _any_moe
    rule = pattern.RewriteRule(_moe_node, LOWERINGS[lowering], check, name=f"Llama4MoE → {lowering}")
    return pattern.RewriteRuleSet([rule]).apply_to_model(model)


def lower_moe_standard(model: ir.Model, form: str) -> int:
    """Llama4MoE → standard ONNX ops in `form` ("gather" or "dense")."""
    return _lower(model, form)


@functools.lru_cache(maxsize=None)
def ort_moe_problem() -> str | None:
    """None when com.microsoft.MoE, lowered as above, matches moe_reference on this onnxruntime; else why not.

    The probe's gate and up pre-activations reach ±22 and ±26 (a third of the gates beyond ±7), so a clamp (gpt-oss'
    swiglu_limit 7), α=1.702 or an `up + 1` shows."""
    rng = np.random.default_rng(0)
    experts, hidden, inter, tokens = 4, 16, 24, 9
    weights = {
        "router": rng.standard_normal((experts, hidden)), "gate_up": rng.standard_normal((experts, hidden, 2 * inter)) * 2,
        "down": rng.standard_normal((experts, inter, hidden)) * 0.3, "shared_gate": rng.standard_normal((inter, hidden)) * 0.3,
        "shared_up": rng.standard_normal((inter, hidden)) * 0.3, "shared_down": rng.standard_normal((hidden, inter)) * 0.3,
    }
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    model = ops.moe_node_model(weights, tokens)
    _lower(model, "ort_moe")
    try:
        out = run_onnxruntime(model, {"x": x})["y"]
    except Exception as exc:  # ORT raises its own types; any failure means "not usable here"
        return f"onnxruntime {ort.__version__} cannot run com.microsoft.MoE as lowered ({str(exc).splitlines()[0][:160]})"
    ref = llama4_moe(x, **weights)
    error = float(np.abs(out - ref).max() / np.abs(ref).max())
    if not error <= 1e-5:
        return f"onnxruntime {ort.__version__}'s com.microsoft.MoE differs from the reference by {error:.2g} × max|out|"
    return None


# ------------------------------------------------------------------------------ INT4 experts on ONNX Runtime
def _int4_parts(weight: ir.Value) -> tuple[str, ir.TensorProtocol, np.ndarray, int] | None:
    """(base name, INT4 tensor [E, N, K], scales [E, N, K/B], B) of an INT4 expert weight, or None."""
    dequantize = _int4_experts(weight)
    if dequantize is None or dequantize.inputs[1].const_value is None:
        return None
    packed, scale = dequantize.inputs[0], dequantize.inputs[1]
    return (packed.name.removesuffix(".int4"), packed.const_value, scale.const_value.numpy(),
            dequantize.attributes.get_int("block_size"))


def _qmoe_blocks(parts: tuple | None) -> tuple | None:
    """QMoE takes whole blocks along K: a row shorter than one block (a tiny model) is one block of K values, which
    quantizes to the same numbers; otherwise K must be a multiple of the block (None: not for QMoE)."""
    if parts is None:
        return None
    name, q, scale, block = parts
    k = int(q.shape[2])
    if k % block == 0:
        return parts
    return (name, q, scale, k) if k < block and k % 16 == 0 and k & (k - 1) == 0 else None


def qmoe_weight(q: ir.TensorProtocol | np.ndarray, scale: np.ndarray, block: int, interleave: bool
                ) -> tuple[np.ndarray, np.ndarray]:
    """INT4 experts q [E, N, K] (values in [-7, 7]) and scales [E, N, K/B] → QMoE's weights [E, N, K/2] uint8 (nibble
    = q + 8, even k in the low nibble) and scales [E, N, K/B]; interleave: gate rows then up rows → g0, u0, g1, u1, …
    (QMoE's fused SwiGLU layout). One expert read at a time (quantize.leading_slice)."""
    experts, rows, k = (int(d) for d in q.shape)
    order = np.arange(rows).reshape(2, rows // 2).T.reshape(-1) if interleave else np.arange(rows)
    packed = np.empty((experts, rows, k // 2), np.uint8)
    for e in range(experts):
        nibbles = (leading_slice(q, e)[order].astype(np.int16) + INT4_ZERO_POINT).astype(np.uint8)
        packed[e] = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return packed, np.ascontiguousarray(scale[:, order], np.float32)


def _qmoe(op: "NodeBuilder", graph: ir.Graph, routed_in: ir.Value, logits: ir.Value, fc1: tuple, fc2: tuple) -> ir.Value:
    """com.microsoft.QMoE over INT4 experts: k = 1 and raw logits as router_probs (the one selected expert's softmax
    weight is exactly 1; the input is pre-scaled by sigmoid(max logit)), interleaved SwiGLU. fc1 / fc2: (name, q, scales,
    block) as _int4_parts gives them."""
    (fc1_name, fc1_q, fc1_scale, block), (fc2_name, fc2_q, fc2_scale, _) = fc1, fc2
    w1, s1 = qmoe_weight(fc1_q, fc1_scale, block, interleave=True)
    w2, s2 = qmoe_weight(fc2_q, fc2_scale, block, interleave=False)
    inputs = [routed_in, logits, op.constant(graph, "fc1", w1, f"{fc1_name}.qmoe"),
              op.constant(graph, "fc1_scale", s1, f"{fc1_name}.qmoe_scale"), None,
              op.constant(graph, "fc2", w2, f"{fc2_name}.qmoe"), op.constant(graph, "fc2_scale", s2, f"{fc2_name}.qmoe_scale")]
    return op("routed", "QMoE", inputs, domain=ORT_DOMAIN, k=1, activation_type="swiglu", swiglu_fusion=1,
              normalize_routing_weights=1, expert_weight_bits=4, block_size=block)


class NodeBuilder:
    """ir.tape with named outputs (serialized models need unique value names)."""

    def __init__(self, prefix: str):
        self.tape, self.prefix = ir.tape.Tape(), prefix

    def __call__(self, name: str, op_type: str, inputs, domain: str = "", **attributes) -> ir.Value:
        value = self.tape.op(op_type, inputs, attributes or None, domain=domain, name=f"{self.prefix}.{name}")
        value.name = f"{self.prefix}.{name}"
        return value

    def outputs(self, name: str, op_type: str, inputs, count: int, domain: str = "", **attributes) -> list[ir.Value]:
        values = self.tape.op_multi_out(op_type, inputs, attributes, num_outputs=count, domain=domain,
                                        name=f"{self.prefix}.{name}")
        for i, value in enumerate(values):
            value.name = f"{self.prefix}.{name}.{i}"
        return list(values)

    def constant(self, graph: ir.Graph, name: str, array: np.ndarray, full_name: str | None = None) -> ir.Value:
        return initializer(graph, full_name or f"{self.prefix}.{name}", array)


def _nbits_linear(graph: ir.Graph, accuracy_level: int):
    """Expert e's linear over INT4 experts (name, q [E, N, K], scales, block): MatMulNBits over its own 4-bit weights."""
    def linear(op: "NodeBuilder", step: str, x: ir.Value, parts: tuple, e: int) -> ir.Value:
        name, q, scale, block = parts
        packed, scales = nbits_weight(leading_slice(q, e), scale[e], block, 4)
        weight, weight_scales = (initializer(graph, f"{name}.e{e}.nbits", packed),
                                 initializer(graph, f"{name}.e{e}.nbits_scale", scales))
        return op(step, "MatMulNBits", [x, weight, weight_scales], domain=ORT_DOMAIN, K=int(q.shape[2]),
                  N=int(q.shape[1]), bits=4, block_size=block, accuracy_level=accuracy_level)
    return linear


def _float_linear(graph: ir.Graph):
    """Expert e's linear over float experts (name, w [E, K, N]: checkpoint layout is MatMul's): MatMul over its slice."""
    def linear(op: "NodeBuilder", step: str, x: ir.Value, parts: tuple, e: int) -> ir.Value:
        name, w = parts
        return op(step, "MatMul", [x, initializer(graph, f"{name}.e{e}", np.ascontiguousarray(leading_slice(w, e)))])
    return linear


def _expert_branch(graph: ir.Graph, prefix: str, e: int, routed_in: ir.Value, column: ir.Value, total: ir.Value,
                   fc1: tuple, fc2: tuple, linear) -> ir.Graph:
    """The taken branch of expert e: gather its tokens (rows where `column` [N, 1] is true), gate/up and down as
    `linear` builds them (over initializers of the main graph: ONNX Runtime prepacks them one level down), and
    scatter-add the result into `total`."""
    op = NodeBuilder(f"{prefix}.e{e}")
    axis_1 = op.constant(graph, "axis_1", np.asarray([1], np.int64))
    rows = op("rows", "Transpose", [op("nonzero", "NonZero", [op("chosen", "Squeeze", [column, axis_1])])], perm=[1, 0])
    tokens = op("tokens", "GatherND", [routed_in, rows])
    gate, up = op.outputs("split", "Split", [linear(op, "gate_up", tokens, fc1, e)], 2, axis=-1, num_outputs=2)
    act = op("act", "Mul", [op("silu", "Mul", [gate, op("sigmoid", "Sigmoid", [gate])]), up])
    added = op("sum", "ScatterND", [total, rows, linear(op, "down", act, fc2, e)], reduction="add")
    return ir.Graph([], [added], nodes=op.tape.nodes, name=f"{prefix}.e{e}.taken")


def _float_parts(weight: ir.Value) -> tuple[str, ir.TensorProtocol] | None:
    """(name, tensor [E, K, N]) of float32 experts stored as one initializer, or None."""
    tensor = weight.const_value
    if tensor is None or tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 3:
        return None
    return weight.name, tensor


def _lower_experts_per_expert(graph: ir.Graph, node: ir.Node, accuracy_level: int, max_if_experts: int) -> str | None:
    """Llama4MoE with INT4 or float32 experts → routing, the shared expert, and the routed experts as one If per
    expert over the running sum — or, beyond max_if_experts INT4 experts, one QMoE node where this onnxruntime's
    matches the reference and both linears have QMoE's one block size. Returns the form used (None: not lowered; more
    float experts than max_if_experts are left to com.microsoft.MoE)."""
    x, router, gate_up, down, shared_gate, shared_up, shared_down = node.inputs
    if x.dtype != ir.DataType.FLOAT:
        return None
    fc1, fc2 = _int4_parts(gate_up), _int4_parts(down)
    if fc1 is not None and fc2 is not None:
        form, linear = INT4_EXPERTS_LOWERING, _nbits_linear(graph, accuracy_level)
    else:
        fc1, fc2 = _float_parts(gate_up), _float_parts(down)
        if fc1 is None or fc2 is None or int(fc1[1].shape[0]) > max_if_experts:
            return None
        form, linear = FLOAT_EXPERTS_LOWERING, _float_linear(graph)
    experts = int(fc1[1].shape[0])
    qmoe_fc1, qmoe_fc2 = (_qmoe_blocks(fc1), _qmoe_blocks(fc2)) if form == INT4_EXPERTS_LOWERING else (None, None)
    qmoe = (experts > max_if_experts and qmoe_fc1 is not None and qmoe_fc2 is not None and qmoe_fc1[3] == qmoe_fc2[3]
            and ort_qmoe_problem() is None)
    prefix = node.name or fc1[0].removesuffix(".experts.gate_up_proj") + ".moe"
    op = NodeBuilder(prefix)
    logits = op("router_logits", "Gemm", [x, router], transB=1)
    axis_last = op.constant(graph, "axis_last", np.asarray([-1], np.int64))
    score = op("router_score", "Sigmoid", [op("router_max", "ReduceMax", [logits, axis_last], keepdims=1)])
    routed_in = op("routed_in", "Mul", [x, score])
    gate = op("shared.gate", "Gemm", [x, shared_gate], transB=1)
    total = op("shared.down", "Gemm", [
        op("shared.act", "Mul", [op("shared.silu", "Mul", [gate, op("shared.sigmoid", "Sigmoid", [gate])]),
                                 op("shared.up", "Gemm", [x, shared_up], transB=1)]),
        shared_down], transB=1)
    if qmoe:
        total = op("sum", "Add", [total, _qmoe(op, graph, routed_in, logits, qmoe_fc1, qmoe_fc2)])
    else:
        expert = op("expert", "ArgMax", [logits], axis=-1, keepdims=1)  # [N, 1]; first index on ties, as the reference
        onehot = op("onehot", "Equal", [expert, op.constant(graph, "expert_ids", np.arange(experts, dtype=np.int64))])
        counts = op("counts", "ReduceMax", [op("onehot_i32", "Cast", [onehot], to=ir.DataType.INT32),
                                            op.constant(graph, "axis_0", np.asarray([0], np.int64))], keepdims=0)
        taken = op.outputs("taken", "Split", [op("taken_any", "Cast", [counts], to=ir.DataType.BOOL)], experts, axis=0,
                           num_outputs=experts)
        columns = op.outputs("column", "Split", [onehot], experts, axis=1, num_outputs=experts)
        for e in range(experts):
            skip = NodeBuilder(f"{prefix}.e{e}.skip")
            kept = skip("sum", "Identity", [total])
            taken_branch = _expert_branch(graph, prefix, e, routed_in, columns[e], total, fc1, fc2, linear)
            total = op(f"e{e}.total", "If", [taken[e]], then_branch=taken_branch,
                       else_branch=ir.Graph([], [kept], nodes=skip.tape.nodes, name=f"{prefix}.e{e}.skipped"))
    graph.insert_before(node, op.tape.nodes)
    total.type, total.shape = node.outputs[0].type, node.outputs[0].shape
    node.outputs[0].replace_all_uses_with(total, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    return QMOE_LOWERING if qmoe else form


def lower_routed_experts(model: ir.Model, accuracy_level: int = ACCURACY_LEVEL,
                         max_if_experts: int = IF_PER_EXPERT_MAX) -> dict[str, int]:
    """Llama4MoE with INT4 or float32 experts → per-expert If { GatherND → MatMulNBits | MatMul → SwiGLU → MatMulNBits
    | MatMul → ScatterND(add) } over the shared expert's output, or QMoE for more than max_if_experts INT4 experts
    (ONNX Runtime). accuracy_level: MatMulNBits' compute, as the other linears'. Returns the count of each form."""
    graph = model.graph
    moe_nodes = [n for n in graph if n.domain == ops.DOMAIN and n.op_type == ops.MOE_OP]
    forms = [_lower_experts_per_expert(graph, n, accuracy_level, max_if_experts) for n in moe_nodes]
    counts = {form: forms.count(form) for form in (INT4_EXPERTS_LOWERING, FLOAT_EXPERTS_LOWERING, QMOE_LOWERING)}
    if any(counts.values()):
        model.opset_imports.setdefault(ORT_DOMAIN, 1)
    return counts


@functools.lru_cache(maxsize=None)
def ort_qmoe_problem() -> str | None:
    """None when com.microsoft.QMoE, as lowered above, matches moe_reference on this onnxruntime; else why not (older
    builds have no 4-bit CPU QMoE). Pre-activations reach ±60, so a clamp, α or `up + 1` would show."""
    rng = np.random.default_rng(0)
    experts, hidden, inter, tokens, block = 4, 64, 96, 9, 32
    gate_up = (rng.standard_normal((experts, hidden, 2 * inter)) * 2).astype(np.float32)
    down = (rng.standard_normal((experts, inter, hidden)) * 0.3).astype(np.float32)
    router = rng.standard_normal((experts, hidden)).astype(np.float32)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    parts, dequantized = [], []
    for name, w in (("fc1", gate_up), ("fc2", down)):
        q, scale = int4_blockwise(w.transpose(0, 2, 1), block, axis=2)  # [E, N, K], blocks along K
        parts.append((name, q, scale, block))
        dequantized.append(int4_dequantize(q, scale, block, axis=2).transpose(0, 2, 1))
    graph = ir.Graph([ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([tokens, hidden]))], [],
                     nodes=[], opset_imports={"": 21, ORT_DOMAIN: 1})
    op = NodeBuilder("probe")
    logits = op("logits", "Gemm", [graph.inputs[0], op.constant(graph, "router", router)], transB=1)
    score = op("score", "Sigmoid", [op("max", "ReduceMax", [logits, op.constant(graph, "axis", np.asarray([-1]))], keepdims=1)])
    out = _qmoe(op, graph, op("routed_in", "Mul", [graph.inputs[0], score]), logits, *parts)
    graph.extend(op.tape.nodes)
    out.name, out.type, out.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([tokens, hidden])
    graph.outputs.append(out)
    zeros = {k: np.zeros(s, np.float32) for k, s in (("shared_gate", (1, hidden)), ("shared_up", (1, hidden)),
                                                    ("shared_down", (hidden, 1)))}
    try:
        got = run_onnxruntime(ir.Model(graph, ir_version=10), {"x": x})["y"]
    except Exception as exc:  # ORT raises its own types; any failure means "not usable here"
        return f"onnxruntime {ort.__version__} cannot run com.microsoft.QMoE as lowered ({str(exc).splitlines()[0][:160]})"
    ref = llama4_moe(x, router, *dequantized, **zeros)
    error = float(np.abs(got - ref).max() / np.abs(ref).max())
    return None if error <= 1e-5 else f"com.microsoft.QMoE differs from the reference by {error:.2g} × max|out|"


def _check_moe_attributes(model: ir.Model) -> None:
    """Every lowering implements top-1 SwiGLU only (all the fusion writes): another node would be lowered wrong."""
    for node in model.graph:
        if node.domain == ops.DOMAIN and node.op_type == ops.MOE_OP:
            top_k = node.attributes.get_int("top_k", ops.MOE_TOP_K)
            activation = node.attributes.get_string("activation", ops.MOE_ACTIVATION)
            if (top_k, activation) != (ops.MOE_TOP_K, ops.MOE_ACTIVATION):
                raise GraphPassError(
                    f"{ops.MOE_OP} node {node.name!r}: top_k={top_k}, activation={activation!r}; the MoE lowerings "
                    f"implement only top_k={ops.MOE_TOP_K} and {ops.MOE_ACTIVATION!r} (Llama 4's routing)")


def lower_moe(model: ir.Model, context: PassContext) -> int:
    """Llama4MoE → If per expert | QMoE | com.microsoft.MoE | standard ops (gather/dense) | Llama4MoEPlugin, by target
    and expert count"""
    _check_moe_attributes(model)
    form = context.moe_form
    if context.target == "tensorrt" and not context.use_trt_plugin and form == "gather" and any(
            n.domain == ops.DOMAIN and n.op_type == ops.MOE_OP and _int4_experts(n.inputs[2]) for n in model.graph):
        # TensorRT's INT4 is DequantizeLinear of a constant into a MatMul: a Gather of the dequantized experts is not
        form = "dense"
        context.notes.append("MoE: INT4 experts on TensorRT are read by MatMul only; the dense form in decode too")
    standard = f"standard ops ({form})"
    counts: dict[str, int] = {}
    if context.target == "tensorrt" and context.use_trt_plugin:
        counts[trt_plugin_spec.PLUGIN_NAME] = _lower(model, "trt_plugin")
    elif context.target == "tensorrt":
        context.notes.append(f"MoE: TensorRT plugin disabled; {standard}")
    else:
        if context.target == "onnxruntime":
            counts.update(lower_routed_experts(model))
        problem = ort_moe_problem()
        if problem is None:  # float32 experts beyond IF_PER_EXPERT_MAX
            counts[f"{ORT_DOMAIN}.MoE"] = _lower(model, "ort_moe")
        elif any(n.domain == ops.DOMAIN and n.op_type == ops.MOE_OP for n in model.graph):
            context.notes.append(f"MoE: {problem}; {standard} instead")
    counts[standard] = _lower(model, form)  # what is left: all of it, or what the ORT op was not checked for
    context.moe_lowering = " + ".join(name for name, count in counts.items() if count) or None
    return sum(counts.values())


def moe_lowering_pass() -> GraphPass:
    return GraphPass("lower_moe", lower_moe, requires=(MOE_FUSED,), produces=(MOE_LOWERED,))
