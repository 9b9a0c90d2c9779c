"""Vision-encoder fusions (onnxruntime): the residual LayerNorm, the bias GELU and the attention of the encoder layers.

  skip_layer_norm  LayerNormalization(Add(a, b), γ, β) over the last axis, a and b of one shape
                   → com.microsoft.SkipLayerNormalization(a, b, γ, β): outputs (normed, …, a + b), the sum taking the
                     Add's place where the residual stream reads it again
  bias_gelu        Gelu(Add(x, bias)), exact (erf) GELU, bias a 1-D constant of x's last axis
                   → com.microsoft.BiasGelu(x, bias)

The rules match float32 graphs (the contrib ops' CPU kernels are fp32). The traced vision graph already carries ONNX
LayerNormalization and Gelu (opset 17 / 20), which TensorRT reads as they are: the tensorrt target needs no fusion.
  attention        Transpose(MatMul(Softmax(MatMul(q, kᵀ) · scale), v)) over heads laid out [B, T, H, d] (q, k after
                   the 2D RoPE), no mask
                   → Reshape(com.microsoft.MultiHeadAttention(q, k, v as [B, T, H·d], scale), [B, T, H, d]); the
                     projections' biases stay Adds before the RoPE, which sits between them and the attention
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

import numpy as np

from ._match import attr, const, dims
from .canonicalize import CANONICAL
from .manager import GraphPass, PassContext

ORT_DOMAIN = "com.microsoft"


def skip_layer_norm_pattern(op, a, b, gamma, beta):
    total = op.Add(a, b, _outputs=["total"])
    return op.LayerNormalization(total, gamma, beta, _outputs=["normed"]), total


def _check_skip_layer_norm(context, a, b, gamma, beta, normed, **_) -> bool:
    """No broadcasting in the Add or of γ, β (the contrib op wants equal shapes and 1-D γ, β of the last axis' size),
    rank 2 or 3, float32, the last axis."""
    a_dims = dims(a)
    return (
        a_dims is not None and b.shape is not None and list(a.shape) == list(b.shape) and len(a_dims) in (2, 3)
        and a_dims[-1] is not None and dims(gamma) == dims(beta) == [a_dims[-1]] and a.dtype == ir.DataType.FLOAT
        and attr(normed, "axis", -1) in (-1, len(a_dims) - 1) and attr(normed, "stash_type", 1) == 1
    )


def skip_layer_norm(op, a, b, gamma, beta, normed, **_):
    out = op.SkipLayerNormalization(a, b, gamma, beta, epsilon=attr(normed, "epsilon", 1e-5), _domain=ORT_DOMAIN,
                                    _version=1, _outputs=4)
    return out[0], out[3]


def bias_gelu_pattern(op, x, bias):
    return op.Gelu(op.Add(x, bias), _outputs=["activated"])


def _check_bias_gelu(context, x, bias, activated, **_) -> bool:
    """Exact GELU (approximate "none"), float32, the bias a constant vector of x's last axis."""
    x_dims, bias_value = dims(x), const(bias)
    return (
        x_dims is not None and x_dims[-1] is not None and x.dtype == ir.DataType.FLOAT
        and bias_value is not None and bias_value.shape == (x_dims[-1],) and attr(activated, "approximate", "none") == "none"
    )


def bias_gelu(op, x, bias, **_):
    return op.BiasGelu(x, bias, _domain=ORT_DOMAIN, _version=1)


def attention_pattern(op, q, k, v, scale):
    scores = op.MatMul(op.Transpose(q, perm=[0, 2, 1, 3]), op.Transpose(k, perm=[0, 2, 3, 1]))
    weights = op.Softmax(op.Mul(scores, scale), _outputs=["weights"])
    return op.Transpose(op.MatMul(weights, op.Transpose(v, perm=[0, 2, 1, 3])), perm=[0, 2, 1, 3])


def _check_attention(context, q, k, v, scale, weights, **_) -> bool:
    """q, k, v [B, T, H, d] of one static H and d, float32; a scalar scale; softmax over the keys."""
    shapes = [dims(x) for x in (q, k, v)]
    scale_value = const(scale)
    return (
        all(s is not None and len(s) == 4 and s[2:] == shapes[0][2:] and None not in s[2:] for s in shapes)
        and q.dtype == ir.DataType.FLOAT and scale_value is not None and scale_value.size == 1
        and attr(weights, "axis", -1) in (-1, 3)
    )


def attention(op, q, k, v, scale, **_):
    heads, head_dim = dims(q)[2:]
    flat = op.Constant(value_ints=[0, 0, -1])
    fused = op.MultiHeadAttention(op.Reshape(q, flat), op.Reshape(k, flat), op.Reshape(v, flat), num_heads=heads,
                                  scale=float(np.asarray(const(scale)).reshape(-1)[0]), _domain=ORT_DOMAIN,
                                  _version=1)
    return op.Reshape(fused, op.Constant(value_ints=[0, 0, heads, head_dim]))


SKIP_LAYER_NORM_RULE = pattern.RewriteRule(skip_layer_norm_pattern, skip_layer_norm, _check_skip_layer_norm,
                                           name="skip_layer_norm")
BIAS_GELU_RULE = pattern.RewriteRule(bias_gelu_pattern, bias_gelu, _check_bias_gelu, name="bias_gelu")
ATTENTION_RULE = pattern.RewriteRule(attention_pattern, attention, _check_attention, name="vision_attention")


def fuse_skip_layer_norm(model: ir.Model, context: PassContext) -> int:
    """Add(a, b) → LayerNormalization(γ, β)  →  com.microsoft.SkipLayerNormalization(a, b, γ, β), sum reused"""
    return pattern.RewriteRuleSet([SKIP_LAYER_NORM_RULE]).apply_to_model(model)


def fuse_bias_gelu(model: ir.Model, context: PassContext) -> int:
    """Gelu(Add(x, bias))  →  com.microsoft.BiasGelu(x, bias)"""
    return pattern.RewriteRuleSet([BIAS_GELU_RULE]).apply_to_model(model)


def fuse_attention(model: ir.Model, context: PassContext) -> int:
    """Transpose → MatMul(q, kᵀ) · scale → Softmax → MatMul(·, v) → Transpose  →  com.microsoft.MultiHeadAttention"""
    return pattern.RewriteRuleSet([ATTENTION_RULE]).apply_to_model(model)


def vision_fusion_passes(target: str) -> list[GraphPass]:
    """The vision graph's fusions for `target` (none for tensorrt: see the module docstring)."""
    if target != "onnxruntime":
        return []
    return [GraphPass("fuse_skip_layer_norm", fuse_skip_layer_norm, requires=(CANONICAL,)),
            GraphPass("fuse_bias_gelu", fuse_bias_gelu, requires=(CANONICAL,)),
            GraphPass("fuse_vision_attention", fuse_attention, requires=(CANONICAL,))]
