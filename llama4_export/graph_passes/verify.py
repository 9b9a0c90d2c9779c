"""Verify mode: run ONNX Runtime on sample inputs after every pass and compare with the graph before any pass.

Deviation of a graph = max over its outputs of max|out − ref| / max|ref| (ref = the unoptimized graph's outputs),
so the issue's bound "≤ 1e-4 × max|logit|" is `tolerance=1e-4`.

Nodes no stock runtime executes are made executable in a copy before running it:
- ai.llama4export::Llama4MoE (the canonical fused op) and the TensorRT plugin node run through their numpy reference
  (moe_reference.llama4_moe_node) registered as ONNX Runtime Python custom ops, when onnxruntime-extensions is
  installed (a test/dev dependency);
- without it, Llama4MoE is lowered to standard ops in the copy (the same lowering the fallback target uses), and a
  graph holding the plugin node cannot be verified (GraphPassError says so).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from ..model import io_spec
from . import ops, trt_plugin_spec
from .errors import GraphPassError
from .lower import lower_moe_standard
from .moe_reference import llama4_moe_node
from .ort_run import run_onnxruntime

DEFAULT_TOLERANCE = 1e-4
# Sizes of the symbolic dimensions in sample inputs: several tokens, two rows, caches that cross a chunk boundary.
SAMPLE_DIMS = {"batch": 2, "new_tokens": 5, "chunk_slots": 6, "global_slots": 14}
REFERENCE_OP_DOMAIN = "ai.onnx.contrib"  # the domain onnxruntime-extensions registers Python ops in


def sample_feeds(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs following io_spec: token ids, consecutive positions after a partly filled cache, random K/V."""
    rng = np.random.default_rng(seed)
    names = {v.name for v in model.graph.inputs}
    dims = dict(SAMPLE_DIMS)
    in_place = io_spec.kv_layout_of(names) == "in_place"
    if in_place and not isinstance(model.graph.inputs[0].shape[1], int):
        dims["batch"] = 1  # GroupQueryAttention takes several new tokens after past ones one row at a time
    shapes = {v.name: [d if isinstance(d, int) else dims.get(str(d), 3) for d in v.shape] for v in model.graph.inputs}
    batch, tokens = shapes[io_spec.INPUT_IDS]
    vocab = next(v.shape[-1] for v in model.graph.outputs if v.name == io_spec.LOGITS)
    feeds = {io_spec.INPUT_IDS: rng.integers(0, vocab, (batch, tokens), dtype=np.int64)}
    if in_place:  # row 1 holds fewer tokens; every row leaves room for the new ones
        for kind, slots in (("chunked", dims["chunk_slots"]), ("global", dims["global_slots"])):
            feeds[io_spec.PAST_LENGTHS[kind]] = np.maximum(slots - tokens - 2 * np.arange(batch), 0).astype(np.int64)
        feeds[io_spec.POSITIONS] = feeds[io_spec.PAST_LENGTHS["global"]][:, None] + np.arange(tokens, dtype=np.int64)
    else:
        global_slots = shapes[io_spec.PAST_POSITIONS["global"]][1]
        chunk_slots = shapes[io_spec.PAST_POSITIONS["chunked"]][1]
        past = np.tile(np.arange(global_slots, dtype=np.int64), (batch, 1))
        past[1:, -2:] = -1  # row 1 has two empty slots
        feeds[io_spec.POSITIONS] = global_slots + np.tile(np.arange(tokens, dtype=np.int64), (batch, 1))
        feeds[io_spec.PAST_POSITIONS["global"]] = past
        feeds[io_spec.PAST_POSITIONS["chunked"]] = past[:, -chunk_slots:].copy()
    if io_spec.LOGITS_INDEX in shapes:  # every token's logits
        feeds[io_spec.LOGITS_INDEX] = np.tile(np.arange(tokens, dtype=np.int64), (batch, 1))
    for value in model.graph.inputs:
        if value.name not in feeds:
            sample = rng.standard_normal(shapes[value.name])
            if value.dtype == ir.DataType.BFLOAT16:  # bf16 graphs run widened to fp32 (executable_copy)
                feeds[value.name] = sample.astype(ml_dtypes.bfloat16).astype(np.float32)
            else:
                feeds[value.name] = sample.astype(value.dtype.numpy())
    return feeds


def reference_ops_available() -> bool:
    try:
        import onnxruntime_extensions  # noqa: F401
    except ImportError:
        return False
    return True


_registered = False


def register_reference_ops() -> str:
    """Register Llama4MoE and the TensorRT plugin op as ORT Python custom ops running the numpy reference.

    Returns the path of the onnxruntime-extensions library to load into a session."""
    global _registered
    from onnxruntime_extensions import PyOp, get_library_path, onnx_op

    if not _registered:
        floats = [PyOp.dt_float] * len(ops.MOE_INPUTS)
        attrs = {"num_experts": PyOp.dt_int64, "top_k": PyOp.dt_int64, "activation": PyOp.dt_string}
        plugin_attrs = {**attrs, "plugin_version": PyOp.dt_string, "plugin_namespace": PyOp.dt_string}

        def reference(*inputs, num_experts, top_k, activation, **_):
            return llama4_moe_node(*inputs, num_experts=num_experts, top_k=top_k, activation=activation)

        onnx_op(op_type=ops.MOE_OP, inputs=floats, outputs=[PyOp.dt_float], attrs=attrs)(reference)
        onnx_op(op_type=trt_plugin_spec.PLUGIN_NAME, inputs=floats, outputs=[PyOp.dt_float], attrs=plugin_attrs)(reference)
        _registered = True
    return get_library_path()


def _own_nodes(model: ir.Model) -> list[ir.Node]:
    ours = {(ops.DOMAIN, ops.MOE_OP), (trt_plugin_spec.PLUGIN_DOMAIN, trt_plugin_spec.PLUGIN_NAME)}
    return [n for n in model.graph.all_nodes() if (n.domain, n.op_type) in ours]


def executable_copy(model: ir.Model) -> tuple[ir.Model, str | None]:
    """A copy ONNX Runtime can run, and the custom-op library it needs (None when it needs none)."""
    if any(v.dtype == ir.DataType.BFLOAT16 for v in _all_values(model.graph)):
        model = widened_bfloat16(model)
    own = _own_nodes(model)
    if not own:
        return model, None
    copy = model.clone()
    if reference_ops_available():
        library = register_reference_ops()
        for node in _own_nodes(copy):
            node.domain = REFERENCE_OP_DOMAIN
            if node.inputs[0].dtype == ir.DataType.FLOAT16:
                _run_in_fp32(copy.graph, node)
        copy.opset_imports[REFERENCE_OP_DOMAIN] = 1
        return copy, library
    if any(n.op_type == trt_plugin_spec.PLUGIN_NAME for n in own):
        raise GraphPassError(
            f"cannot verify a graph holding the {trt_plugin_spec.PLUGIN_NAME} node without its reference op: "
            "pip install onnxruntime-extensions (or verify the --trt-fallback lowering)"
        )
    lower_moe_standard(copy, "gather")
    return copy, None


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph.all_nodes():
        yield from node.outputs


def widened_bfloat16(model: ir.Model) -> ir.Model:
    """A copy of a bf16 graph computing in fp32: bf16 tensors, weights (exactly: bf16 ⊂ fp32), Casts and constants become
    fp32. ONNX Runtime's CPU EP has no bf16 kernels, so this is how a bf16 graph's structure is checked on it — the
    passes' rewrites are verified, bf16 rounding of activations is not (that needs TensorRT or the CUDA EP)."""
    copy = model.clone()
    for value in list(_all_values(copy.graph)):
        if value.dtype == ir.DataType.BFLOAT16:
            value.type = ir.TensorType(ir.DataType.FLOAT)  # a new type: clone() shares type objects with `model`
            if value.const_value is not None:
                value.const_value = ir.tensor(value.const_value.numpy().astype(np.float32), name=value.name)
    for node in copy.graph.all_nodes():
        for attr in node.attributes.values():
            if attr.name == "to" and attr.value == ir.DataType.BFLOAT16:
                node.attributes["to"] = ir.AttrInt64("to", ir.DataType.FLOAT)
            elif attr.type == ir.AttributeType.TENSOR and attr.value.dtype == ir.DataType.BFLOAT16:
                node.attributes[attr.name] = ir.AttrTensor(attr.name, ir.tensor(attr.value.numpy().astype(np.float32)))
    return copy


def _run_in_fp32(graph: ir.Graph, node: ir.Node) -> None:
    """Replace an fp16 reference node by Cast(fp32) → the node in fp32 → Cast(fp16): Python ops take fp32 only (the
    reference computes in float64 either way)."""
    casts = [ir.node("Cast", [value], attributes={"to": ir.DataType.FLOAT}) for value in node.inputs]
    wide = ir.Node(node.domain, node.op_type, [c.outputs[0] for c in casts], list(node.attributes.values()),
                   version=node.version, num_outputs=1)
    wide.outputs[0].dtype = ir.DataType.FLOAT
    back = ir.node("Cast", [wide.outputs[0]], attributes={"to": ir.DataType.FLOAT16})
    ir.convenience.replace_nodes_and_values(graph, node, [node], [*casts, wide, back], node.outputs, back.outputs)


def deviation(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> tuple[float, str]:
    """(max over outputs of max|out − ref| / max|ref|, the output where it is largest)."""
    worst, where = 0.0, ""
    for name, ref in reference.items():
        if name not in outputs or outputs[name].shape != ref.shape:
            raise GraphPassError(f"output {name!r} changed shape or disappeared: a pass broke the graph interface")
        scale = max(float(np.abs(ref).max(initial=0.0)), np.finfo(np.float32).tiny)
        value = float(np.abs(outputs[name].astype(np.float64) - ref).max(initial=0.0)) / scale
        if not np.isfinite(value) or value > worst:
            worst, where = (float("inf") if not np.isfinite(value) else value), name
    return worst, where


class Verifier:
    """Holds the unoptimized graph's outputs on fixed sample inputs; `check` compares a later graph with them."""

    def __init__(self, reference_model: ir.Model, tolerance: float = DEFAULT_TOLERANCE, seed: int = 0):
        self.tolerance = tolerance
        self.feeds = sample_feeds(reference_model, seed)
        runnable, library = executable_copy(reference_model)
        self.reference = run_onnxruntime(runnable, self.feeds, library)

    def check(self, model: ir.Model, after: str) -> tuple[float, str]:
        runnable, library = executable_copy(model)
        value, output = deviation(run_onnxruntime(runnable, self.feeds, library), self.reference)
        if value > self.tolerance:
            raise GraphPassError(
                f"after pass {after!r} output {output!r} moved by {value:.3g} × its max magnitude "
                f"(tolerance {self.tolerance:g}); the pass is wrong for this graph — run without it and report a bug"
            )
        return value, output
