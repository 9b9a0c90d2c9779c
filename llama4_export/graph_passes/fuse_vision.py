"""Vision-encoder fusions (onnxruntime): the residual LayerNorm and the bias GELU of the encoder layers.

  skip_layer_norm  LayerNormalization(Add(a, b), γ, β) over the last axis, a and b of one shape
                   → com.microsoft.SkipLayerNormalization(a, b, γ, β): outputs (normed, …, a + b), the sum taking the
                     Add's place where the residual stream reads it again
  bias_gelu        Gelu(Add(x, bias)), exact (erf) GELU, bias a 1-D constant of x's last axis
                   → com.microsoft.BiasGelu(x, bias)

The rules match float32 graphs (the contrib ops' CPU kernels are fp32). The traced vision graph already carries ONNX
LayerNormalization and Gelu (opset 17 / 20), which TensorRT reads as they are: the tensorrt target needs no fusion.
The vision attention stays standard ops: its 2D RoPE turns q and k between the biased projections and the attention,
so com.microsoft.MultiHeadAttention's bias input cannot take their biases; a fusion of the rest (MatMul → Softmax →
MatMul, no mask) into that op is not written yet.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from ._match import attr, const, dims
from .canonicalize import CANONICAL
from .manager import GraphPass, PassContext

ORT_DOMAIN = "com.microsoft"


def skip_layer_norm_pattern(op, a, b, gamma, beta):
    total = op.Add(a, b, _outputs=["total"])
    return op.LayerNormalization(total, gamma, beta, _outputs=["normed"]), total


def _check_skip_layer_norm(context, a, b, normed, **_) -> bool:
    """No broadcasting in the Add (the contrib op wants equal shapes), rank 2 or 3, float32, the last axis."""
    a_dims = dims(a)
    return (
        a_dims is not None and b.shape is not None and list(a.shape) == list(b.shape) and len(a_dims) in (2, 3)
        and a_dims[-1] is not None and a.dtype == ir.DataType.FLOAT
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


SKIP_LAYER_NORM_RULE = pattern.RewriteRule(skip_layer_norm_pattern, skip_layer_norm, _check_skip_layer_norm,
                                           name="skip_layer_norm")
BIAS_GELU_RULE = pattern.RewriteRule(bias_gelu_pattern, bias_gelu, _check_bias_gelu, name="bias_gelu")


def fuse_skip_layer_norm(model: ir.Model, context: PassContext) -> int:
    """Add(a, b) → LayerNormalization(γ, β)  →  com.microsoft.SkipLayerNormalization(a, b, γ, β), sum reused"""
    return pattern.RewriteRuleSet([SKIP_LAYER_NORM_RULE]).apply_to_model(model)


def fuse_bias_gelu(model: ir.Model, context: PassContext) -> int:
    """Gelu(Add(x, bias))  →  com.microsoft.BiasGelu(x, bias)"""
    return pattern.RewriteRuleSet([BIAS_GELU_RULE]).apply_to_model(model)


def vision_fusion_passes(target: str) -> list[GraphPass]:
    """The vision graph's fusions for `target` (none for tensorrt: see the module docstring)."""
    if target != "onnxruntime":
        return []
    return [GraphPass("fuse_skip_layer_norm", fuse_skip_layer_norm, requires=(CANONICAL,)),
            GraphPass("fuse_bias_gelu", fuse_bias_gelu, requires=(CANONICAL,))]
