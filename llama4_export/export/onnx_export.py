"""PyTorch → ONNX: the decode and prefill graphs of a range of decoder layers (the whole model, or one part of a
partitioned export) with the explicit KV-cache interface of model/io_spec.py.

Graphs are traced from a model on PyTorch's meta device (`trace_graphs`): shapes only, no data, so tracing costs the
same memory for Scout as for a tiny preset; the writer (writer.py) fills the weights in from a weight source. Each
graph goes through `torch.onnx.export(dynamo=True)` without its optimizer, then through onnxscript's optimizer
with the model's weights hidden from it (turned into graph inputs for the duration). Left visible, the optimizer would
replace small weights by transposed copies named `val_N` (large ones it leaves alone, so the graph's structure would
depend on model size) and merge weights that happen to be equal (a preset's all-ones norms). Hidden, every weight
keeps its checkpoint name and layout in both graphs, which is what lets decode.onnx and prefill.onnx point into one
external-data file and lets later passes (quantization, calibration) find weights by name.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch
from onnxscript import rewriter
from onnxscript.optimizer import _constant_folding as folding
from onnxscript.rewriter.rules.common import slice_split_rule
from torch import Tensor, nn
from torch.export import Dim

from ..model import io_spec
from ..model.config import Llama4Config
from ..model.config import Llama4VisionConfig
from ..model.modeling import InPlaceKV, KVCache, Llama4ForCausalLM, MoE, MoEImpl
from ..model.multimodal import merge_image_features
from ..model.vision import Llama4VisionEncoder
from . import trace_cache

OPSET = 21  # opset 21 has DequantizeLinear with block_size (INT4 weight-only) for the quantization passes
# Node metadata worth keeping: module scopes let passes find e.g. every MoE block. Stack traces (absolute source
# paths) and FX node dumps are dropped so the bytes do not depend on where the code lives.
KEPT_NODE_METADATA = ("pkg.torch.onnx.class_hierarchy", "pkg.torch.onnx.name_scopes")
_WRAPPER_PREFIX = "model."

# Example sizes used while tracing: distinct and > 1 so torch.export neither specializes nor unifies the dimensions.
_EXAMPLE = {"batch": 2, "new_tokens": 3, "chunk_slots": 5, "global_slots": 7, "logits": 2, "image_tokens": 4, "tiles": 2}


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: how many new tokens it takes and which MoE implementation it traces."""

    name: str
    moe_impl: MoEImpl
    new_tokens: int | None  # fixed count, or None for a dynamic `new_tokens` dimension

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


# decode reads only the selected expert's weights (Gather); prefill traces the dense MoE until the fused MoE op
# replaces it, which computes every expert but has no data-dependent shapes.
DECODE = GraphSpec("decode", moe_impl="gather", new_tokens=1)
PREFILL = GraphSpec("prefill", moe_impl="dense", new_tokens=None)
GRAPHS = (DECODE, PREFILL)
VISION_FILE = "vision.onnx"


class GraphIO(nn.Module):
    """Maps io_spec's flat inputs/outputs onto `Llama4ForCausalLM.forward` over a range of decoder layers."""

    def __init__(self, model: Llama4ForCausalLM, layers: range, logits_index: bool, kv_layout: str,
                 image_token_id: int | None = None):
        """image_token_id: the graph fuses image features in at this token's rows (io_spec.takes_image_features)."""
        super().__init__()
        self.model, self.layers, self.logits_index, self.kv_layout = model, layers, logits_index, kv_layout
        self.image_token_id = image_token_id

    def forward(  # input_ids: token ids, or hidden states entering a part (the name is recorded in the graph's metadata)
        self, input_ids: Tensor, positions: Tensor, past_chunked: Tensor, past_global: Tensor, *rest: Tensor
    ) -> tuple[Tensor, ...]:
        """past_chunked/past_global: the slots' positions, or the valid lengths (in_place layout); rest: the past K/V
        of every layer, then logits_index and image_features when the graph takes them."""
        config = self.model.config
        past_kv, extra = rest[:2 * len(self.layers)], list(rest[2 * len(self.layers):])
        logits_index = extra.pop(0) if self.logits_index else None
        if self.image_token_id is not None:
            features = extra.pop(0)
            is_image = input_ids == self.image_token_id
            # Placeholders past the features given keep their embeddings, as transformers does without pixel values:
            # a text-only step (zero rows) and a sampled `<|patch|>` fed back through this graph stay plain tokens.
            # (counted in float32, as merge_image_features counts: TensorRT's CumSum takes float types only)
            is_image = is_image & (torch.cumsum(is_image.reshape(-1).float(), 0).view_as(is_image) <= features.shape[0])
            input_ids = merge_image_features(self.model.model.embed_tokens(input_ids), is_image, features)
        index = {"chunked": past_chunked, "global": past_global}
        per_layer = [index[io_spec.attention_kind(config, i)] for i in self.layers]
        keys, values = list(past_kv[0::2]), list(past_kv[1::2])
        cache = InPlaceKV(keys, values, per_layer) if self.kv_layout == "in_place" else KVCache(keys, values, per_layer)
        out, new = self.model(input_ids, positions, cache, layers=self.layers, logits_index=logits_index)
        outputs = [out.float() if self.layers.stop == config.num_hidden_layers else out]
        for key, value in zip(new.keys, new.values):
            outputs += [key, value]
        return tuple(outputs)


def example_inputs(config: Llama4Config, spec: GraphSpec, dtype: torch.dtype, layers: range,
                   kv_layout: str, vision: bool = False) -> tuple[Tensor, ...]:
    """Zero-filled inputs in io_spec order with the tracing sizes of `_EXAMPLE`."""
    batch = _EXAMPLE["batch"]
    tokens = spec.new_tokens or _EXAMPLE["new_tokens"]
    slots = {"chunked": _EXAMPLE["chunk_slots"], "global": _EXAMPLE["global_slots"]}
    first = torch.zeros(batch, tokens, dtype=torch.int64) if layers.start == 0 else torch.zeros(batch, tokens, config.hidden_size, dtype=dtype)
    inputs = [first, torch.zeros(batch, tokens, dtype=torch.int64)]
    for kind in ("chunked", "global"):
        inputs.append(torch.zeros(batch, dtype=torch.int64) if kv_layout == "in_place"
                      else torch.zeros(batch, slots[kind], dtype=torch.int64))
    for layer in layers:
        shape = (batch, config.num_key_value_heads, slots[io_spec.attention_kind(config, layer)], config.head_dim)
        inputs += [torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)]
    if io_spec.takes_logits_index(config, layers, spec.new_tokens):
        inputs.append(torch.zeros(batch, _EXAMPLE["logits"], dtype=torch.int64))
    if io_spec.takes_image_features(layers, spec.new_tokens, vision):
        inputs.append(torch.zeros(_EXAMPLE["image_tokens"], config.hidden_size, dtype=dtype))
    return tuple(inputs)


def _dynamic_shapes(config: Llama4Config, spec: GraphSpec, layers: range, kv_layout: str, vision: bool) -> tuple:
    """Named dynamic dimensions (they keep their names in the ONNX graph). No upper bounds: ONNX keeps none, and the
    prefill limit is the runtime's business (recorded in the manifest)."""
    batch = Dim("batch")
    slots = {kind: Dim(name) for kind, name in io_spec.SLOT_DIMS.items()}
    tokens = {0: batch} if spec.new_tokens else {0: batch, 1: Dim("new_tokens", min=1)}
    rest = []
    for layer in layers:
        cache_dims = {0: batch, 2: slots[io_spec.attention_kind(config, layer)]}
        rest += [cache_dims, cache_dims]
    if io_spec.takes_logits_index(config, layers, spec.new_tokens):
        rest.append({0: batch, 1: Dim("logits", min=1)})
    if io_spec.takes_image_features(layers, spec.new_tokens, vision):
        rest.append({0: Dim("image_tokens", min=0)})
    cache_index = [{0: batch} if kv_layout == "in_place" else {0: batch, 1: slots[kind]} for kind in ("chunked", "global")]
    # The *rest varargs form one entry of their own.
    return (tokens, tokens, *cache_index, tuple(rest))


def export_graph(model: Llama4ForCausalLM, spec: GraphSpec, layers: range | None = None,
                 kv_layout: str = "positions", image_token_id: int | None = None) -> ir.Model:
    """Trace one graph of `layers` (default: all) with the MoE implementation `spec` asks for and the KV-cache layout
    `kv_layout` (io_spec.KV_LAYOUTS), and return it in memory (weights still attached), canonicalized and
    deterministic. image_token_id: the model has a vision graph; its prefill fuses image features in at this token."""
    config = model.config
    layers = range(config.num_hidden_layers) if layers is None else layers
    vision = image_token_id is not None
    fuses = io_spec.takes_image_features(layers, spec.new_tokens, vision)
    previous_impls = {m: m.impl for m in model.modules() if isinstance(m, MoE)}
    model.set_moe_impl(spec.moe_impl)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                GraphIO(model, layers, io_spec.takes_logits_index(config, layers, spec.new_tokens), kv_layout,
                        image_token_id if fuses else None),
                example_inputs(config, spec, model.lm_head.weight.dtype, layers, kv_layout, vision),
                dynamic_shapes=_dynamic_shapes(config, spec, layers, kv_layout, vision),
                input_names=io_spec.input_names(config, layers, spec.new_tokens, kv_layout, vision),
                output_names=io_spec.output_names(config, layers, kv_layout), opset_version=OPSET, dynamo=True,
                optimize=False,
                verbose=False,
            )
    finally:
        for module, impl in previous_impls.items():
            module.impl = impl
    onnx_model = program.model
    _optimize_keeping_weights(onnx_model)
    _canonicalize(onnx_model)
    return onnx_model


def trace_graphs(config: Llama4Config, dtype: torch.dtype, layers: range | None = None,
                 kv_layout: str = "positions", image_token_id: int | None = None) -> dict[str, ir.Model]:
    """decode + prefill of `layers` traced from a meta-device model: graphs with data-less weights (each
    const_value is a meta torch tensor named by its parameter; the writer fills them in from a weight source).
    image_token_id: the artifact has a vision graph (export_graph)."""
    return traced_graphs(config, dtype, layers, kv_layout, image_token_id)[0]


def traced_graphs(config: Llama4Config, dtype: torch.dtype, layers: range | None = None,
                  kv_layout: str = "positions", image_token_id: int | None = None,
                  cached: bool = True) -> tuple[dict[str, ir.Model], bool]:
    """trace_graphs, and whether the graphs came from the on-disk trace cache (trace_cache.py).

    A trace depends on nothing but its arguments and costs seconds per layer, so the last few are kept in this
    process, in front of the disk cache, and handed out as copies (the writer and the passes edit the graphs they
    get). cached=False: traced anew, neither cache read nor written (a rebuild checks the trace too)."""
    if not cached:
        return _trace_graphs(config, dtype, layers, kv_layout, image_token_id), False
    key = (config, dtype, layers, kv_layout, image_token_id)
    from_disk = False
    if key not in _TRACES:
        while len(_TRACES) >= TRACE_CACHE_SIZE:
            _TRACES.pop(next(iter(_TRACES)))
        _TRACES[key], from_disk = trace_cache.cached(trace_arguments(*key), lambda: _trace_graphs(*key))
    return {name: model.clone() for name, model in _TRACES[key].items()}, from_disk


def trace_arguments(config: Llama4Config, dtype: torch.dtype, layers: range | None, kv_layout: str,
                    image_token_id: int | None) -> dict:
    """What a decode + prefill trace depends on besides the code: the trace cache's key (trace_cache.entry_key)."""
    layers = range(config.num_hidden_layers) if layers is None else layers
    return {"graphs": "decoder", "config": trace_cache.config_fields(config), "dtype": str(dtype),
            "layers": [layers.start, layers.stop, layers.step], "kv_layout": kv_layout,
            "image_token_id": image_token_id}


# Traces kept per process (each holds graph structure only: ~11 MB per layer at Scout's shapes).
TRACE_CACHE_SIZE = 4
_TRACES: dict[tuple, dict[str, ir.Model]] = {}


def _trace_graphs(config: Llama4Config, dtype: torch.dtype, layers: range | None, kv_layout: str,
                  image_token_id: int | None) -> dict[str, ir.Model]:
    with torch.device("meta"):
        model = Llama4ForCausalLM(config).to(dtype)
        # The RoPE frequencies stay fp32 whatever the weights' dtype (weights.source.finish_model).
        model.rope_inv_freq = torch.empty(config.head_dim // 2, dtype=torch.float32)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.eval().requires_grad_(False)
        # Inputs are created under the same default device, so the whole trace is data-free.
        return {spec.name: export_graph(model, spec, layers, kv_layout, image_token_id) for spec in GRAPHS}


class VisionIO(nn.Module):
    """pixel_values [tiles, 3, S, S] → image_features [tiles · tokens_per_tile, text hidden] (io_spec: the rows the
    prefill's image_features input takes, in order)."""

    def __init__(self, encoder: Llama4VisionEncoder):
        super().__init__()
        self.model = encoder

    def forward(self, pixel_values: Tensor) -> Tensor:
        features = self.model(pixel_values)
        return features.reshape(-1, features.shape[-1])


def trace_vision(config: Llama4VisionConfig, dtype: torch.dtype, cached: bool = True) -> ir.Model:
    """The vision encoder + projector traced from a meta-device model with a dynamic tile count: data-less weights
    named as in the checkpoint, the RoPE tables (fp32 whatever the weights) included (weights.VisionWeights computes
    them). Through the on-disk trace cache unless cached=False."""
    if not cached:
        return _trace_vision(config, dtype)
    arguments = {"graphs": "vision", "config": trace_cache.config_fields(config), "dtype": str(dtype)}
    return trace_cache.cached(arguments, lambda: {"vision": _trace_vision(config, dtype)})[0]["vision"]


def _trace_vision(config: Llama4VisionConfig, dtype: torch.dtype) -> ir.Model:
    with torch.device("meta"):
        encoder = Llama4VisionEncoder(config).to(dtype).eval().requires_grad_(False)
        tables = (config.patches_per_side**2 + 1, config.head_dim // 2)
        encoder.vision_model.rope_cos = torch.empty(tables, dtype=torch.float32)
        encoder.vision_model.rope_sin = torch.empty(tables, dtype=torch.float32)
        pixels = torch.zeros(_EXAMPLE["tiles"], config.num_channels, config.image_size, config.image_size, dtype=dtype)
        with _quiet_exporter():
            program = torch.onnx.export(
                VisionIO(encoder), (pixels,), dynamic_shapes=({0: Dim("tiles", min=1)},),
                input_names=[io_spec.PIXEL_VALUES], output_names=[io_spec.IMAGE_FEATURES], opset_version=OPSET,
                dynamo=True, optimize=False, verbose=False,
            )
    onnx_model = program.model
    _optimize_keeping_weights(onnx_model)
    _canonicalize(onnx_model)
    return onnx_model


def _optimize_keeping_weights(model: ir.Model) -> None:
    """Run onnxscript's optimizer (folding, no-op removal, CSE) with the model's parameters and buffers as graph
    inputs, so it can neither fold nor merge them; then restore them as initializers under their checkpoint names
    (GraphIO stores the model as `model`, hence the prefix)."""
    graph = model.graph
    weights = {}
    for name in [n for n in graph.initializers if n.startswith(_WRAPPER_PREFIX)]:
        value = graph.initializers.pop(name)
        weights[name] = (value, value.const_value)
        value.const_value = None
        graph.inputs.append(value)
    _optimize(model)
    for name, (value, tensor) in weights.items():
        graph.inputs.remove(value)
        value.const_value = tensor
        value.name = name[len(_WRAPPER_PREFIX):]
        if value.uses():
            graph.register_initializer(value)


# onnxscript's default rewrite rules less SlicesSplit: that two-output pattern tries every pair of Slice nodes, so its
# cost grows with the square of the graph (a fifth of a scout-tiny export), and it never matches a Llama 4 graph
# (its RoPE rotates interleaved pairs, not halves). tests/test_export.py checks the result equals optimize_ir's.
_REWRITE_RULES = tuple(rule for rule in rewriter._DEFAULT_REWRITE_RULES if rule is not slice_split_rule)


def _optimize(model: ir.Model) -> None:
    """onnxscript.optimizer.optimize_ir's passes, in its order and with its defaults, over _REWRITE_RULES."""
    fold = folding.FoldConstantsPass(shape_inference=True,
                                     input_size_limit=folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                     output_size_limit=folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT)
    simplify = [fold, rewriter.RewritePass(_REWRITE_RULES), common_passes.RemoveUnusedNodesPass(),
                common_passes.RemoveUnusedFunctionsPass(), common_passes.RemoveUnusedOpsetsPass()]
    ir.passes.Sequential(
        common_passes.InlinePass(),
        ir.passes.PassManager(simplify, steps=2, early_stop=True),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )(model)


def _canonicalize(model: ir.Model) -> None:
    """Drop path-dependent metadata and sort initializers by name, so the bytes depend only on the model."""
    model.doc_string = None
    model.metadata_props.clear()
    graph = model.graph
    graph.doc_string = None
    graph.metadata_props.clear()
    for node in graph:
        node.doc_string = None
        kept = {k: v for k, v in node.metadata_props.items() if k in KEPT_NODE_METADATA}
        node.metadata_props.clear()
        node.metadata_props.update(kept)
        # Float attributes as the ONNX file stores them (float32, e.g. epsilon 1e-05 → 9.999999747e-06): the bytes do
        # not change, and a trace equals its reload from the trace cache.
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.FLOAT:
                node.attributes[name] = ir.Attr(name, attr.type, float(np.float32(attr.value)),
                                                doc_string=attr.doc_string)
    for value in graph.initializers.values():
        value.metadata_props.clear()
        # ir.save names every initializer's tensor after its value anyway; named here, a trace equals its reload
        # from the trace cache (the optimizer's constants have none).
        value.const_value.name = value.name
    initializers = [graph.initializers.pop(name) for name in list(graph.initializers)]
    for value in sorted(initializers, key=lambda v: v.name):
        graph.register_initializer(value)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx logs optional-dependency notes (torchvision) and shape-naming warnings that are not ours to fix."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
