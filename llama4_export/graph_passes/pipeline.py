"""`optimize`: canonicalize → fuse (MoE routing, RMSNorm, RoPE) → lower for a target → tidy, with a pass report."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from ..model import io_spec
from .canonicalize import canonicalization_passes, eliminate_common_subexpressions, eliminate_dead_code
from .decode_attention import decode_attention_pass
from .errors import GraphPassError
from .fuse_moe import moe_fusion_passes
from .fuse_transformer import transformer_fusion_passes
from .fuse_vision import vision_fusion_passes
from .lower import moe_lowering_pass
from .lower_linears import ort_linear_passes
from .sibling_projections import sibling_projections_pass
from .weight_layout import weight_layout_pass
from .quantize import QuantSpec, quantization_passes
from .manager import GraphPass, PassContext, PassReport, run_passes
from .verify import DEFAULT_TOLERANCE, Verifier

TARGETS = ("onnxruntime", "tensorrt")
MOE_FORMS = ("auto", "gather", "dense")
# CSE merges constants up to this many elements (the unit scales of the QK norms, the RoPE index helpers).
CONSTANT_CSE_LIMIT = 1 << 16


def default_target() -> str:
    """tensorrt when TensorRT is importable here, else onnxruntime."""
    return "tensorrt" if importlib.util.find_spec("tensorrt") is not None else "onnxruntime"


def moe_form_for(model: ir.Model) -> str:
    """gather for a graph taking one new token per row (decode), dense otherwise (prefill)."""
    for value in model.graph.inputs:
        if value.name == io_spec.INPUT_IDS and value.shape is not None and len(value.shape) == 2:
            return "gather" if value.shape[1] == 1 else "dense"
    return "gather"


def tidy(model: ir.Model, context: PassContext) -> int:
    """duplicate helper nodes and constants → one; Constant nodes → initializers; dead nodes → removed"""
    before = sum(1 for _ in model.graph.all_nodes())
    common_passes.CommonSubexpressionEliminationPass(size_limit=CONSTANT_CSE_LIMIT)(model)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    eliminate_dead_code(model, context)
    _sort_initializers(model.graph)
    return before - sum(1 for _ in model.graph.all_nodes())


def _sort_initializers(graph: ir.Graph) -> None:
    """Initializers in name order, so the saved bytes depend only on the graph (as the exporter does)."""
    values = [graph.initializers.pop(name) for name in list(graph.initializers)]
    for value in sorted(values, key=lambda v: v.name):
        graph.register_initializer(value)


def is_vision_graph(model: ir.Model) -> bool:
    return any(value.name == io_spec.PIXEL_VALUES for value in model.graph.inputs)


def check_target(target: str, error: type[Exception] = GraphPassError) -> None:
    """error: the exporter's own check raises its ConfigError, the graph passes' their GraphPassError."""
    if target not in TARGETS:
        raise error(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")


def passes_for(target: str, quantize: bool = False, vision: bool = False) -> list[GraphPass]:
    """quantize: add the quantization passes (quantize.py): experts before the MoE lowering, linears after it.
    vision: add the vision encoder's fusions (fuse_vision.py)."""
    check_target(target)
    quantize_experts, quantize_linears, quantize_kv_cache = quantization_passes() if quantize else ((), (), ())
    return [
        *canonicalization_passes(),
        *moe_fusion_passes(),
        *transformer_fusion_passes(target),
        *(vision_fusion_passes(target) if vision else ()),
        *([quantize_experts] if quantize else []),
        moe_lowering_pass(),
        *([quantize_linears, quantize_kv_cache] if quantize else []),
        *(ort_linear_passes() if quantize and target == "onnxruntime" else ()),
        *([decode_attention_pass()] if target == "onnxruntime" else []),
        weight_layout_pass(),
        *([sibling_projections_pass()] if target == "onnxruntime" else []),
        GraphPass("cse[final]", eliminate_common_subexpressions),
        GraphPass("tidy", tidy),
    ]


def optimize(
    model: ir.Model | onnx.ModelProto | str | Path,
    target: str | None = None,
    verify: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    moe_form: str = "auto",
    trt_plugin: bool = True,
    quantization: QuantSpec | None = None,
    attention_chunk: int | None = None,
) -> tuple[ir.Model, PassReport]:
    """Optimize a graph for `target` (default: default_target()). An ir.Model is rewritten in place.

    verify: run ONNX Runtime after every pass and raise GraphPassError when an output moves by more than
    `tolerance` × its max magnitude. moe_form: the standard-op MoE lowering when one is used ("auto": gather for
    decode graphs, dense for prefill). trt_plugin=False lowers the MoE to standard ops on the tensorrt target too.
    quantization: quantize the weights as it says (quantize.py), in the same run. attention_chunk: the model's
    attention chunk (decode_attention.py regroups chunked layers' decode when it is long)."""
    target = target or default_target()
    if moe_form not in MOE_FORMS:
        raise GraphPassError(f"unknown MoE form {moe_form!r}; choose one of: {', '.join(MOE_FORMS)}")
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    elif isinstance(model, (str, Path)):
        model = ir.load(model)
    passes = passes_for(target, quantize=quantization is not None, vision=is_vision_graph(model))
    context = PassContext(target, moe_form_for(model) if moe_form == "auto" else moe_form, use_trt_plugin=trt_plugin,
                          quantization=quantization, attention_chunk=attention_chunk)
    verifier = Verifier(model, tolerance) if verify else None
    return model, run_passes(model, passes, context, verifier)
