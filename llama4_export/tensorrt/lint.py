"""TensorRT conformance lint: does a tensorrt-lowered ONNX graph parse into a strongly typed TensorRT network?

Runs without TensorRT (CI). Checks, per node:
- op   — the op is in TensorRT's ONNX support table (trt_onnx_support.py: TensorRT 10.15), in the default domain within
         its opset range, its main input's data type is one the table lists, and inputs the table's restrictions
         require to be constant are;
- type — strong typing: every tensor has a known type TensorRT knows (no DOUBLE, no unknown types), and ops whose
         inputs and output share one type in ONNX really do (a strongly typed network never inserts casts: a
         precision change is an explicit Cast);
- int4 — INT4 weight-only quantization as TensorRT takes it: DequantizeLinear of an INT4 constant initializer with a
         block_size along the reduction axis of the MatMul/Gemm it feeds, a constant scale of the block shape, no
         zero point (or an all-zero constant one);
- fp8  — FP8 QuantizeLinear/DequantizeLinear use float8e4m3fn with constant scales and no (or zero) zero point;
- plugin — a plugin node has the registered plugin's op type, namespace, version and exactly its attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from ..artifact import MANIFEST, partition_entries, read_manifest, verify_files
from ..model.config import Llama4Config
from ..graph_passes import trt_plugin_spec
from . import trt_onnx_support as support
from .errors import BuildError
from .moe_plugin import plugin_attribute_types
from .profiles import engine_graphs

DT = ir.DataType
TYPE_TAGS = {
    DT.FLOAT: "FP32", DT.FLOAT16: "FP16", DT.BFLOAT16: "BF16", DT.FLOAT8E4M3FN: "FP8", DT.FLOAT4E2M1: "FP4",
    DT.INT32: "INT32", DT.INT64: "INT64", DT.INT8: "INT8", DT.INT4: "INT4", DT.UINT8: "UINT8", DT.BOOL: "BOOL",
}
FLOAT8_TYPES = {t for t in DT if t.name.startswith("FLOAT8")}
# Ops whose ONNX schema gives the listed inputs and the first output one type T: a mismatch means the graph relies on
# an implicit conversion, which a strongly typed TensorRT network does not make.
SAME_TYPE_INPUTS: dict[str, tuple[int, ...] | None] = {
    **{op: None for op in ("Add", "Sub", "Mul", "Div", "MatMul", "Max", "Min", "Sum", "Mean", "Concat", "Neg", "Abs",
                           "Relu", "Sigmoid", "Tanh", "Softmax", "Sqrt", "Reciprocal", "Exp", "Log", "Erf")},
    "Gemm": (0, 1, 2), "Where": (1, 2),
}


@dataclass(frozen=True)
class Violation:
    rule: str  # op | type | int4 | fp8 | plugin
    node: str  # node name, or "graph"
    message: str

    def format(self, where: str = "") -> str:
        prefix = f"{where}: " if where else ""
        return f"{prefix}[{self.rule}] {self.node}: {self.message}"


def plugin_attributes() -> dict[str, type]:
    """The attributes the registered plugin declares (moe_plugin's descriptor signature), besides version/namespace."""
    return plugin_attribute_types()


def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return True
    if value.const_value is not None or value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx")


def _constant_array(value: ir.Value) -> np.ndarray | None:
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor().numpy()
    return None


def _describe(value: ir.Value) -> str:
    producer = value.producer()
    return f"{value.name!r}" + (f" (computed by {producer.op_type} node {producer.name!r})" if producer is not None else "")


def _tag(dtype: DT | None) -> str | None:
    return None if dtype is None else TYPE_TAGS.get(dtype, dtype.name)


class _Linter:
    def __init__(self, model: ir.Model):
        self.model, self.violations = model, []
        self.plugin_attrs = plugin_attributes()

    def add(self, rule: str, node: ir.Node | None, message: str) -> None:
        self.violations.append(Violation(rule, "graph" if node is None else f"node {node.name!r} ({node.op_type})", message))

    def run(self) -> list[Violation]:
        graph = self.model.graph
        opset = self.model.opset_imports.get("", None)
        low, high = support.OPSET_RANGE
        if opset is not None and not low <= opset <= high:
            self.add("op", None, f"default-domain opset {opset} is outside TensorRT {support.TENSORRT_VERSION}'s "
                                 f"{low}..{high}; re-run the graph passes for --target tensorrt")
        for value in [*graph.inputs, *graph.outputs]:
            self._check_type(None, value)
        for node in graph.all_nodes():
            if (node.domain, node.op_type) == (trt_plugin_spec.PLUGIN_DOMAIN, trt_plugin_spec.PLUGIN_NAME) or \
                    node.op_type == trt_plugin_spec.PLUGIN_NAME:
                self._check_plugin(node)
                continue
            if node.domain not in ("", "ai.onnx"):
                self.add("op", node, f"{node.domain}::{node.op_type} is not an ONNX op TensorRT parses and no plugin of "
                                     f"that name is ours; lower it for --target tensorrt (or register a plugin)")
                continue
            if not self._check_op(node):
                continue  # an op TensorRT lacks: its output types are moot
            for value in node.outputs:
                self._check_type(node, value)
            self._check_same_types(node)
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                self._check_qdq(node)
        return self.violations

    # --- op support ------------------------------------------------------------------------------------------
    def _check_op(self, node: ir.Node) -> bool:
        """False when TensorRT has no such op."""
        if node.op_type not in support.OPERATORS:
            self.add("op", node, f"{node.op_type} is not supported by TensorRT {support.TENSORRT_VERSION}'s ONNX parser "
                                 f"({support.SOURCE}); rewrite it with supported ops")
            return False
        main = node.inputs[0] if node.inputs else None
        tag = _tag(main.dtype) if main is not None else None
        if tag is not None and tag not in support.types_of(node.op_type):
            self.add("op", node, f"input {main.name!r} is {tag}, but TensorRT's {node.op_type} takes "
                                 f"{', '.join(support.types_of(node.op_type))}")
        for index in support.CONSTANT_INPUTS.get(node.op_type, ()):
            if index < len(node.inputs) and not _is_constant(node.inputs[index]):
                kind = "int4" if node.op_type == "DequantizeLinear" and tag == "INT4" else (
                    "fp8" if tag == "FP8" or node.op_type == "QuantizeLinear" else "op")
                self.add(kind, node, f"input {index} {_describe(node.inputs[index])} must be a build-time constant "
                                     "(an initializer) for TensorRT")
        return True

    # --- strong typing ---------------------------------------------------------------------------------------
    def _check_type(self, node: ir.Node | None, value: ir.Value) -> None:
        if value.dtype is None:
            self.add("type", node, f"tensor {value.name!r} has no type; a strongly typed network needs every type "
                                   "(run ONNX shape inference before saving)")
        elif value.dtype not in TYPE_TAGS:
            self.add("type", node, f"tensor {value.name!r} is {value.dtype.name}, which TensorRT does not support "
                                   "(a strongly typed network never casts implicitly); Cast it explicitly")

    def _check_same_types(self, node: ir.Node) -> None:
        if node.op_type not in SAME_TYPE_INPUTS:
            return
        positions = SAME_TYPE_INPUTS[node.op_type] or range(len(node.inputs))
        values = [node.inputs[i] for i in positions if i < len(node.inputs) and node.inputs[i] is not None]
        values += node.outputs[:1]
        types = {v.name: v.dtype for v in values if v.dtype is not None}
        if len(set(types.values())) > 1:
            listing = ", ".join(f"{name} {dtype.name}" for name, dtype in types.items())
            self.add("type", node, f"mixes precisions ({listing}); a strongly typed network needs an explicit Cast")

    # --- quantization ----------------------------------------------------------------------------------------
    def _zero_point_ok(self, node: ir.Node, rule: str) -> None:
        zero_point = node.inputs[2] if len(node.inputs) > 2 else None
        if zero_point is None:
            return
        array = _constant_array(zero_point)
        if array is None:
            return  # the constant-input check already reported it
        if np.any(array.astype(np.float32) != 0):
            self.add(rule, node, f"zero point {zero_point.name!r} is not 0; TensorRT supports symmetric quantization "
                                 "only (drop the zero point or make it 0)")

    def _check_qdq(self, node: ir.Node) -> None:
        quantized = node.inputs[0] if node.op_type == "DequantizeLinear" else node.outputs[0]
        if node.op_type == "QuantizeLinear" and len(node.inputs) > 2 and node.inputs[2] is not None:
            quantized = node.inputs[2]  # the zero point carries the output type
        dtype = quantized.dtype
        if dtype in FLOAT8_TYPES:
            if dtype != DT.FLOAT8E4M3FN:
                self.add("fp8", node, f"{quantized.name!r} is {dtype.name}; TensorRT's FP8 is float8e4m3fn (E4M3)")
            self._zero_point_ok(node, "fp8")
        elif dtype in (DT.INT4, DT.UINT4):
            if node.op_type == "DequantizeLinear":
                self._check_int4(node)
            else:
                self.add("int4", node, "INT4 QuantizeLinear (activation quantization) is not a TensorRT INT4 mode; "
                                       "INT4 is weight-only (DequantizeLinear of a constant)")
        else:
            self._zero_point_ok(node, "op")

    def _check_int4(self, node: ir.Node) -> None:
        weight, scale = node.inputs[0], node.inputs[1]
        if weight.dtype == DT.UINT4:
            self.add("int4", node, f"weight {weight.name!r} is UINT4; TensorRT takes signed INT4 (symmetric, no zero point)")
        if not weight.is_initializer() and weight.const_value is None:
            self.add("int4", node, f"weight {_describe(weight)} is not a constant initializer; TensorRT's INT4 is "
                                   "weight-only (quantize the initializer offline)")
        self._zero_point_ok(node, "int4")
        block = node.attributes.get("block_size")
        block = block.as_int() if block is not None else 0
        if block <= 0:
            self.add("int4", node, "has no block_size attribute; TensorRT's INT4 needs block quantization "
                                   "(block_size along the reduction axis, e.g. 128)")
            return
        rank = len(weight.shape) if weight.shape is not None else None
        if rank is None:
            return
        axis_attr = node.attributes.get("axis")
        axis = axis_attr.as_int() if axis_attr is not None else 1
        axis = axis + rank if axis < 0 else axis
        for consumer in node.outputs[0].consumers():
            reduction = _reduction_axis(consumer, node.outputs[0], rank)
            if reduction is None:
                self.add("int4", node, f"feeds {consumer.op_type} node {consumer.name!r}; INT4 DequantizeLinear must feed "
                                       "the weight input of a MatMul, Gemm or the MoE plugin (directly or through a "
                                       "Transpose)")
            elif axis != reduction:
                self.add("int4", node, f"axis={axis} but {consumer.op_type} node {consumer.name!r} reduces over axis "
                                       f"{reduction} of {weight.name!r}; block-quantize along the reduction axis")
        if scale.shape is not None and weight.shape is not None and all(isinstance(d, int) for d in weight.shape):
            expected = [(-(-d // block) if i == axis else d) for i, d in enumerate(weight.shape)]
            if list(scale.shape) != expected:
                self.add("int4", node, f"scale {scale.name!r} has shape {list(scale.shape)}, expected {expected} for "
                                       f"weight {list(weight.shape)} with block_size {block} on axis {axis}")

    # --- plugin ----------------------------------------------------------------------------------------------
    def _check_plugin(self, node: ir.Node) -> None:
        spec = trt_plugin_spec
        if (node.domain, node.op_type) != (spec.PLUGIN_DOMAIN, spec.PLUGIN_NAME):
            self.add("plugin", node, f"is {node.domain}::{node.op_type}; the registered plugin node is "
                                     f"{spec.PLUGIN_DOMAIN}::{spec.PLUGIN_NAME}")
        attrs = node.attributes
        for name, expected in (("plugin_namespace", spec.PLUGIN_NAMESPACE), ("plugin_version", spec.PLUGIN_VERSION)):
            got = attrs[name].value if name in attrs else None
            if got != expected:
                self.add("plugin", node, f"attribute {name} is {got!r}, the registered plugin has {expected!r}; "
                                         "TensorRT would not find the plugin")
        for name, kind in self.plugin_attrs.items():
            if name not in attrs:
                self.add("plugin", node, f"attribute {name!r} is missing; the registered plugin "
                                         f"{spec.PLUGIN_NAMESPACE}::{spec.PLUGIN_NAME} requires {kind.__name__} {name}")
                continue
            ok = attrs[name].type == (ir.AttributeType.INT if kind is int else ir.AttributeType.STRING)
            if not ok:
                self.add("plugin", node, f"attribute {name!r} is {attrs[name].type.name}; the plugin declares {kind.__name__}")
        extra = sorted(set(attrs) - set(self.plugin_attrs) - {"plugin_namespace", "plugin_version"})
        if extra:
            self.add("plugin", node, f"attribute {extra[0]!r} is not declared by the registered plugin "
                                     f"(declared: {', '.join(self.plugin_attrs)})")
        if len(node.inputs) != len(spec.PLUGIN_INPUTS):
            self.add("plugin", node, f"has {len(node.inputs)} inputs; the plugin takes {len(spec.PLUGIN_INPUTS)} "
                                     f"({', '.join(spec.PLUGIN_INPUTS)})")
            return
        router = node.inputs[1]
        if "num_experts" in attrs and attrs["num_experts"].type == ir.AttributeType.INT and router is not None \
                and router.shape is not None and attrs["num_experts"].as_int() != router.shape[0]:
            self.add("plugin", node, f"num_experts={attrs['num_experts'].as_int()} but router {router.name!r} has "
                                     f"{router.shape[0]} rows")
        for name, supported in (("top_k", 1), ("activation", "swiglu")):
            if name in attrs and attrs[name].value != supported:
                self.add("plugin", node, f"{name}={attrs[name].value!r}; the plugin implements {name}={supported!r} only")
        dtypes = {v.dtype for v in node.inputs if v is not None and v.dtype is not None}
        if len(dtypes) > 1:
            self.add("plugin", node, "inputs mix " + ", ".join(sorted(d.name for d in dtypes)) +
                                     "; the plugin takes x and all weights in one float type")


# Plugin inputs that are weights, with the axis each reduces over (checkpoint layouts, trt_plugin_spec / ops.py):
# gate_up [E, H, 2I] and down [E, I, H] are x @ W (K = axis 1); the shared expert is nn.Linear [out, in] (K = axis 1).
PLUGIN_WEIGHT_REDUCTION_AXIS = {2: 1, 3: 1, 4: 1, 5: 1, 6: 1}


def _reduction_axis(consumer: ir.Node, weight: ir.Value, rank: int) -> int | None:
    """The axis of `weight` (rank `rank`) its consumer reduces over, or None when it is not a weight input.

    Follows Transpose (the quantized experts are stored [E, N, K] and transposed back to the checkpoint layout)."""
    if consumer.op_type == "MatMul" and len(consumer.inputs) > 1 and consumer.inputs[1] is weight:
        return rank - 2
    if consumer.op_type == "Gemm" and len(consumer.inputs) > 1 and consumer.inputs[1] is weight and rank == 2:
        trans = consumer.attributes.get("transB")
        return 1 if trans is not None and trans.as_int() else 0
    if consumer.op_type == trt_plugin_spec.PLUGIN_NAME:
        for index, axis in PLUGIN_WEIGHT_REDUCTION_AXIS.items():
            if index < len(consumer.inputs) and consumer.inputs[index] is weight:
                return axis
        return None
    if consumer.op_type == "Transpose":
        perm_attr = consumer.attributes.get("perm")
        perm = list(perm_attr.as_ints()) if perm_attr is not None else list(reversed(range(rank)))
        axes = {_reduction_axis(c, consumer.outputs[0], rank) for c in consumer.outputs[0].consumers()}
        if len(axes) != 1 or None in axes:
            return None
        return perm[axes.pop()]
    return None


def lint_model(model: ir.Model | onnx.ModelProto | str | Path) -> list[Violation]:
    """Every conformance violation of one graph (empty: it should parse into a strongly typed TensorRT network).

    Types missing from the file are inferred first with ONNX's own shape inference (as TensorRT's parser infers
    them); a tensor whose type still cannot be known is a violation."""
    if isinstance(model, ir.Model):
        model = ir.to_proto(model)
    elif not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)  # types and shapes only: weights stay on disk
    return _Linter(ir.from_proto(onnx.shape_inference.infer_shapes(model, strict_mode=False))).run()


def lint_artifact(directory: str | Path) -> dict[str, list[Violation]]:
    """lint_model for every graph of a tensorrt-lowered artifact (the vision graph too, every part's graphs of a
    partitioned one); {graph file: violations}."""
    directory = Path(directory)
    manifest = read_manifest(directory, verify=False)
    target = manifest.get("target")
    if target != "tensorrt":
        raise BuildError(f"{directory}: lowered for {target!r}, not tensorrt; export it with --target tensorrt first")
    parts = manifest.get("partitions") or []
    if not manifest.get("graphs") and not parts:
        raise BuildError(f"{directory}/manifest.json lists no graphs; re-run the export")
    graphs = engine_graphs(manifest)  # a partitioned artifact's: its vision graph, if any
    verify_files(directory, manifest, graphs.values())  # the graphs only: the weights are not read
    found = {graphs[name]: lint_model(directory / graphs[name]) for name in sorted(graphs)}
    if parts:  # each part's manifest lists its own graphs: "part0/decode.onnx", …
        layers = Llama4Config.from_manifest(manifest, str(directory / MANIFEST)).num_hidden_layers
        for part, _ in partition_entries(directory, manifest, layers):
            found.update({f"{part}/{file}": violations for file, violations in lint_artifact(directory / part).items()})
    return found
