"""Transformer fusions: RMSNorm, residual + RMSNorm, interleaved RoPE — each straight into the target's op.

  rms_norm        Mul(Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2), last axis), eps)))), w)
                  → RMSNormalization(x, w) (opset 23; ONNX Runtime runs it with the kernel of its contrib
                    SimplifiedLayerNormalization, which is not an ONNX op: onnx.checker refused the graphs holding it)
  unweighted      the same without the weight (Llama 4's QK norm; in fp16 graphs also the fp32 core of every norm,
                  whose weight multiplies after a Cast) → the same op with a unit scale
  skip_rms_norm   (onnxruntime) RMSNormalization(Add(a, b), w) with the sum used again (the residual)
                  → com.microsoft.SkipSimplifiedLayerNormalization(a, b, w): outputs (normed, …, a + b)
  rope            interleaved pairs of x [B, T, H, D] as [B, T, H, D/2, 2]: (a, b) → (a·cos − b·sin, a·sin + b·cos),
                  stacked back and viewed as the graph needs (model.apply_rope)
                  → onnxruntime: com.microsoft.RotaryEmbedding(interleaved=1). Its cos/sin are tables indexed by
                    position_ids; the graph already has per-token cos/sin [B, T, D/2], so they become a [B·T, D/2]
                    table with position_ids = arange(B·T) reshaped [B, T] — exact for any absolute position, no
                    max-position table (Scout's 10M positions would need a 2.5 GB one).
                  → tensorrt: RotaryEmbedding (opset 23), which takes per-token cos/sin [B, T, D/2] directly.

The rules match float32 graphs: an fp16 export computes norms and RoPE in fp32 between Casts, and keeps them as
standard ops (exact, just unfused).

Attention is not fused here. In-place graphs (ONNX Runtime) get com.microsoft.GroupQueryAttention from the exporter
itself (model/modeling.py; decode_attention.py regroups its one-row decode form); positions-layout graphs (TensorRT,
FP8 caches) keep standard ops, the exact choice there: ONNX Attention (opset 23/24) on onnxruntime 1.32 differs from
the graph on fully masked rows (padding queries, position -1) — only its opset-25 float-mask form matched — and the
standard ops keep the mask computed from positions (io_spec) intact.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxscript.version_converter
from onnxscript.rewriter import pattern

from ._match import attr, const, const_equals, dims, last_axis
from .canonicalize import CANONICAL
from .manager import GraphPass, PassContext

ORT_DOMAIN = "com.microsoft"
FUSED_OPSET = 23  # ONNX RMSNormalization (both targets) and RotaryEmbedding (the tensorrt target)
ONNX_NORM_EPSILON = 1e-5  # RMSNormalization's default epsilon


def _normalized(op, x, eps):
    mean_square = op.ReduceMean(op.Pow(x, 2.0), _allow_other_inputs=True, _outputs=["mean_square"])
    return op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(mean_square, eps))))


def rms_norm_pattern(op, x, eps, weight):
    return op.Mul(_normalized(op, x, eps), weight)


def weightless_rms_norm_pattern(op, x, eps):
    return _normalized(op, x, eps)


def _check_norm(context, x, eps, mean_square, weight=None, **_) -> bool:
    """Mean over the last axis, kept; a scalar epsilon; a weight (when present) of the last axis' size."""
    x_dims = dims(x)
    if not x_dims or x_dims[-1] is None or x.dtype != ir.DataType.FLOAT:
        return False
    eps_value = const(eps)
    reduce = mean_square.producer()
    ok = (
        eps_value is not None and eps_value.size == 1
        and len(reduce.inputs) > 1 and last_axis(x, reduce.inputs[1]) and attr(mean_square, "keepdims", 1) == 1
    )
    if weight is not None:
        ok = ok and weight.const_value is not None and list(weight.shape) == [x_dims[-1]]
    return ok


def _norm_op(op, x, scale, eps):
    epsilon = float(const(eps).reshape(-1)[0])
    return op.RMSNormalization(x, scale, axis=-1, epsilon=epsilon, stash_type=1, _version=FUSED_OPSET)


def _unit_scale(op, x):
    return op.Constant(value=ir.tensor(np.ones(x.shape[-1], dtype=np.float32)))


NORM_RULE = pattern.RewriteRule(
    rms_norm_pattern, lambda op, x, eps, weight, **_: _norm_op(op, x, weight, eps), _check_norm, name="rms_norm"
)
UNWEIGHTED_NORM_RULE = pattern.RewriteRule(
    weightless_rms_norm_pattern, lambda op, x, eps, **_: _norm_op(op, x, _unit_scale(op, x), eps), _check_norm,
    name="unweighted_rms_norm",
)


def upgrade_opset(model: ir.Model, context: PassContext) -> int:
    """opset 21 → 23 (onnxscript's version converter), for RMSNormalization and RotaryEmbedding"""
    before = model.opset_imports.get("")
    onnxscript.version_converter.convert_version(model, FUSED_OPSET)
    return int(model.opset_imports.get("") != before)


# --- residual + RMSNorm (onnxruntime) ------------------------------------------------------------------------
def skip_norm_pattern(op, a, b, weight):
    total = op.Add(a, b, _outputs=["total"])
    return op.RMSNormalization(total, weight, _outputs=["normed"]), total


def _check_skip_norm(context, a, b, weight, normed, **_) -> bool:
    """No broadcasting in the Add or of the weight (the contrib op wants equal shapes and a 1-D gamma of the last
    axis' size), rank 2 or 3, normalized over the last axis."""
    a_dims, b_dims = dims(a), dims(b)
    return (
        a.shape is not None and b.shape is not None and list(a.shape) == list(b.shape) and len(a.shape) in (2, 3)
        and None not in (a_dims[-1], b_dims[-1]) and dims(weight) == [a_dims[-1]]
        and attr(normed, "axis", -1) in (-1, len(a.shape) - 1)
        and attr(normed, "stash_type", 1) == 1
    )


def skip_norm(op, a, b, weight, normed, **_):
    # ε stated even where the norm leaves it at ONNX's default: the contrib op's own default is 1e-12
    out = op.SkipSimplifiedLayerNormalization(a, b, weight, epsilon=attr(normed, "epsilon", ONNX_NORM_EPSILON),
                                              _domain=ORT_DOMAIN, _version=1, _outputs=4)
    return out[0], out[3]


SKIP_NORM_RULE = pattern.RewriteRule(skip_norm_pattern, skip_norm, _check_skip_norm, name="skip_rms_norm")


# --- RoPE ----------------------------------------------------------------------------------------------------
def rope_pattern(op, x, c, s, first, second, out_shape):
    # c, s = Unsqueeze(cos|sin, [2]): shared by the q and k rotations, so matched as inputs and checked below
    pairs = op.Reshape(x, _allow_other_inputs=True, _outputs=["pairs"])
    a, b = op.Gather(pairs, first, _outputs=["a"]), op.Gather(pairs, second, _outputs=["b"])
    real = op.Sub(op.Mul(a, c), op.Mul(b, s))
    imag = op.Add(op.Mul(a, s), op.Mul(b, c))
    stacked = op.Concat(op.Unsqueeze(real, _allow_other_inputs=True, _outputs=["real_u"]),
                        op.Unsqueeze(imag, _allow_other_inputs=True, _outputs=["imag_u"]), _outputs=["stacked"])
    return op.Reshape(stacked, out_shape, _allow_other_attributes=True, _outputs=["rotated"])


def _per_head(value: ir.Value) -> ir.Value | None:
    """cos for value = Unsqueeze(cos, [2]) (broadcast over the heads axis), else None."""
    node = value.producer()
    if node is None or node.op_type != "Unsqueeze" or node.domain not in ("", "ai.onnx") or not const_equals(node.inputs[1], [2]):
        return None
    return node.inputs[0]


def _check_rope(context, x, c, s, first, second, out_shape, pairs, a, real_u, imag_u, stacked, rotated, **_) -> bool:
    """x [B, T, H·D] or [B, T, H, D] viewed as [B, T, H, D/2, 2]; cos/sin [B, T, D/2] broadcast over heads;
    element 0 and 1 of each pair, restacked on a new last axis. The final Reshape may target any view (q goes straight
    to its GQA grouping): reshaping the rotated [B, T, H·D] to it is the same when its zeros are literal (allowzero)."""
    cos, sin = _per_head(c), _per_head(s)
    if cos is None or sin is None:
        return False
    p, x_dims, c_dims = dims(pairs), dims(x), dims(cos)
    if p is None or x_dims is None or c_dims is None or len(p) != 5 or len(c_dims) != 3:
        return False
    heads, half = p[2], p[3]
    if heads is None or half is None or p[4] != 2 or c_dims[2] != half:
        return False
    if x_dims[2:] not in ([heads * 2 * half], [heads, 2 * half]) or x.dtype != ir.DataType.FLOAT:
        return False
    target = const(out_shape)
    literal_zeros = attr(rotated, "allowzero", 0) == 1 or (target is not None and 0 not in target.tolist()[2:])
    same_rows = [str(d) for d in x.shape[:2]] == [str(d) for d in pairs.shape[:2]] == [str(d) for d in cos.shape[:2]]
    return (
        literal_zeros and same_rows and list(map(str, sin.shape)) == list(map(str, cos.shape))
        and const_equals(first, 0) and const_equals(second, 1)
        and attr(a, "axis", 0) in (4, -1) and _gather_axis_ok(pairs)
        and all(_unsqueeze_last(v) for v in (real_u, imag_u)) and attr(stacked, "axis") in (4, -1)
    )


def _gather_axis_ok(pairs: ir.Value) -> bool:
    return all(use.node.op_type != "Gather" or use.node.attributes["axis"].value in (4, -1) for use in pairs.uses())


def _unsqueeze_last(value: ir.Value) -> bool:
    axes = const(value.producer().inputs[1])
    return axes is not None and axes.tolist() in ([-1], [4])


def _heads_last_flat(op, x):
    """x as [B, T, H·D] (the RotaryEmbedding input layout with num_heads)."""
    return x if len(x.shape) == 3 else op.Reshape(x, op.Constant(value_ints=[0, 0, -1]))


def rope_ort(op, x, c, s, out_shape, pairs, **_):
    cos, sin = _per_head(c), _per_head(s)
    heads, half = dims(pairs)[2], dims(pairs)[3]
    table_shape = op.Constant(value_ints=[-1, half])
    rows = op.Slice(op.Shape(cos), op.Constant(value_ints=[0]), op.Constant(value_ints=[2]))  # [B, T]
    count = op.ReduceProd(rows, keepdims=0)
    position_ids = op.Reshape(op.Range(op.Constant(value_int=0), count, op.Constant(value_int=1)), rows)
    rotated = op.RotaryEmbedding(
        _heads_last_flat(op, x), position_ids, op.Reshape(cos, table_shape), op.Reshape(sin, table_shape),
        interleaved=1, num_heads=heads, _domain=ORT_DOMAIN, _version=1,
    )
    return op.Reshape(rotated, out_shape)


def rope_onnx(op, x, c, s, out_shape, pairs, **_):
    cos, sin, heads = _per_head(c), _per_head(s), dims(pairs)[2]
    rotated = op.RotaryEmbedding(_heads_last_flat(op, x), cos, sin, interleaved=1, num_heads=heads,
                                 _version=FUSED_OPSET)
    return op.Reshape(rotated, out_shape)


def transformer_fusion_passes(target: str) -> list[GraphPass]:
    rope_rule = pattern.RewriteRule(rope_pattern, rope_onnx if target == "tensorrt" else rope_ort, _check_rope, name="rope")

    def fuse_rms_norm(model, context):
        """Pow → ReduceMean → Add ε → Sqrt → Reciprocal → Mul x → Mul w  →  RMSNormalization"""
        return pattern.RewriteRuleSet([NORM_RULE]).apply_to_model(model)

    def fuse_unweighted_rms_norm(model, context):
        """the same without the weight (QK norm)  →  the norm op with a unit scale"""
        return pattern.RewriteRuleSet([UNWEIGHTED_NORM_RULE]).apply_to_model(model)

    def fuse_skip_rms_norm(model, context):
        """Add(a, b) → RMSNormalization, sum reused  →  SkipSimplifiedLayerNormalization(a, b)"""
        return pattern.RewriteRuleSet([SKIP_NORM_RULE]).apply_to_model(model)

    def fuse_rope(model, context):
        """view pairs → (a·cos − b·sin, a·sin + b·cos) → stack → view  →  RotaryEmbedding(interleaved=1)"""
        return pattern.RewriteRuleSet([rope_rule]).apply_to_model(model)

    opset = "opset_23"
    passes = [
        GraphPass("upgrade_opset", upgrade_opset, requires=(CANONICAL,), produces=(opset,)),
        GraphPass("fuse_rms_norm", fuse_rms_norm, requires=(CANONICAL, opset), produces=("rms_norm_fused",)),
        GraphPass("fuse_unweighted_rms_norm", fuse_unweighted_rms_norm, requires=("rms_norm_fused",)),
    ]
    if target == "onnxruntime":
        passes.append(GraphPass("fuse_skip_rms_norm", fuse_skip_rms_norm, requires=("rms_norm_fused",)))
    passes.append(GraphPass("fuse_rope", fuse_rope, requires=(CANONICAL, opset)))
    return passes
