"""`--partitions N`: the decoder stack split into N contiguous layer ranges, each its own decode + prefill ONNX with
its own weights file and KV-cache inputs, for models that do not fit one GPU (part k runs on cuda:k).

out/
  manifest.json        the model, "partitions": [{"layers": [start, stop], "directory": "part0"}, …]; sha256 of every file
  part0/ … partN-1/    each a graph-pass-ready artifact of its own (manifest.json, decode.onnx, prefill.onnx, model.data)
  tokenizer files

Part interface (io_spec's, cut at the layer boundaries):
  inputs   input_ids (part 0) | hidden_states [batch, new_tokens, hidden] (other parts); positions,
           past_positions_chunked, past_positions_global; past_key.{i}, past_value.{i} for the part's layers i
  outputs  logits float32 (last part) | hidden_states_out (other parts); new_key.{i}, new_value.{i}
The runtime (runtime/partitioned.py) runs the parts in order, passing hidden states from one to the next.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn
from torch.export import Dim

from ..artifact import atomic_directory, write_manifest
from ..errors import ConfigError
from ..model.config import Llama4Config
from ..model.modeling import Llama4ForCausalLM
from . import io_spec, onnx_export
from .onnx_export import GRAPHS, GraphSpec, save_graphs, trace_wrapper
from .pipeline import DEFAULT_MAX_PREFILL, ModelSource, _check_arguments, _manifest, _Steps
from .tokenizer_files import copy_tokenizer_files, write_byte_level_tokenizer

HIDDEN_IN = "hidden_states"
HIDDEN_OUT = "hidden_states_out"


def part_directory(index: int) -> str:
    return f"part{index}"


def part_input_names(config: Llama4Config, layers: range) -> list[str]:
    first = io_spec.INPUT_IDS if layers.start == 0 else HIDDEN_IN
    names = [first, io_spec.POSITIONS, io_spec.PAST_POSITIONS["chunked"], io_spec.PAST_POSITIONS["global"]]
    for i in layers:
        names += [io_spec.past_key(i), io_spec.past_value(i)]
    return names


def part_output_names(config: Llama4Config, layers: range) -> list[str]:
    names = [io_spec.LOGITS if layers.stop == config.num_hidden_layers else HIDDEN_OUT]
    for i in layers:
        names += [io_spec.new_key(i), io_spec.new_value(i)]
    return names


class PartIO(nn.Module):
    """Layers `layers` of the model behind the part interface. The layer loop is Llama4ForCausalLM.forward's."""

    def __init__(self, model: Llama4ForCausalLM, layers: range, embed: bool = True):
        super().__init__()
        self.model = model
        self.layers = layers
        self.embed = embed and layers.start == 0  # False: the first part is given hidden states already

    def forward(self, x: Tensor, positions: Tensor, past_positions_chunked: Tensor, past_positions_global: Tensor,
                *past_kv: Tensor) -> tuple[Tensor, ...]:
        model, config = self.model, self.model.config
        past_positions = {"chunked": past_positions_chunked, "global": past_positions_global}
        freqs = positions.float()[..., None] * model.rope_inv_freq
        cos, sin = torch.cos(freqs), torch.sin(freqs)
        if self.embed:
            x = model.model.embed_tokens(x)
        outputs = []
        for j, i in enumerate(self.layers):
            layer = model.model.layers[i]
            attn, k, v = layer.self_attn(layer.input_layernorm(x), positions, cos, sin, past_kv[2 * j], past_kv[2 * j + 1],
                                         past_positions[io_spec.attention_kind(config, i)])
            x = x + attn
            x = x + layer.feed_forward(layer.post_attention_layernorm(x))
            outputs += [k, v]
        head = model.lm_head(model.model.norm(x)).float() if self.layers.stop == config.num_hidden_layers else x
        return (head, *outputs)


def _example_inputs(config: Llama4Config, spec: GraphSpec, layers: range, dtype: torch.dtype) -> tuple[Tensor, ...]:
    full = onnx_export.example_inputs(config, spec, dtype)
    batch, tokens = full[0].shape
    first = full[0] if layers.start == 0 else torch.zeros(batch, tokens, config.hidden_size, dtype=dtype)
    return (first, *full[1:4], *full[4 + 2 * layers.start: 4 + 2 * layers.stop])


def _dynamic_shapes(config: Llama4Config, spec: GraphSpec, layers: range) -> tuple:
    batch = Dim("batch")
    slots = {"chunked": Dim("chunk_slots"), "global": Dim("global_slots")}
    tokens = {0: batch} if spec.new_tokens else {0: batch, 1: Dim("new_tokens", min=1)}
    past = []
    for i in layers:
        dims = {0: batch, 2: slots[io_spec.attention_kind(config, i)]}
        past += [dims, dims]
    return (tokens, tokens, {0: batch, 1: slots["chunked"]}, {0: batch, 1: slots["global"]}, tuple(past))


def export_part_graph(model: Llama4ForCausalLM, spec: GraphSpec, layers: range):
    """One part's graph, traced as onnx_export.export_graph traces the whole model."""
    config = model.config
    return trace_wrapper(model, spec, PartIO(model, layers), _example_inputs(config, spec, layers, model.lm_head.weight.dtype),
                         _dynamic_shapes(config, spec, layers), part_input_names(config, layers),
                         part_output_names(config, layers))


def export_partitioned(
    out: str | Path,
    source: ModelSource,
    partitions: int,
    precision: str = "fp32",
    max_prefill: int = DEFAULT_MAX_PREFILL,
    target: str | None = None,
    optimize: bool = True,
    trt_plugin: bool = True,
    show_progress: bool = True,
    model: Llama4ForCausalLM | None = None,
) -> dict[str, Any]:
    """Export `partitions` contiguous layer ranges (plan.partition_layers: balanced weight bytes) as separate graphs.

    model: export this already loaded model instead of loading `source` (as export_artifact)."""
    from ..graph_passes import optimize_artifact
    from ..plan import partition_layers

    out = Path(out)
    dtype = _check_arguments(out, source, precision, max_prefill)
    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"--partitions with --precision {precision}: partitioned exports support fp32 and fp16 for now")
    with _Steps(show_progress) as step:
        if model is None:
            with step(f"load {source.describe()} ({precision})"):
                model = source.load(dtype)
        config = model.config
        ranges = partition_layers(config, partitions, precision="fp16" if precision == "fp16" else "fp32")
        entries = []
        with atomic_directory(out) as tmp:
            for index, layers in enumerate(ranges):
                part = tmp / part_directory(index)
                part.mkdir()
                with step(f"export part {index}: layers {layers.start}–{layers.stop - 1}"):
                    graphs = {spec.name: export_part_graph(model, spec, layers) for spec in GRAPHS}
                    save_graphs(graphs, part)
                    for spec in GRAPHS:
                        onnx.checker.check_model(str(part / spec.file))
                    write_manifest(part, _part_manifest(model, source, precision, max_prefill, layers))
                if optimize:
                    optimize_artifact(part, target, trt_plugin=trt_plugin, show_progress=False)
                entries.append({"layers": [layers.start, layers.stop], "directory": part_directory(index)})
            if source.checkpoint is not None:
                tokenizer = {"source": "checkpoint", "files": copy_tokenizer_files(source.checkpoint, tmp)}
            else:
                tokenizer = {"source": "byte-level", "files": write_byte_level_tokenizer(config, tmp)}
            top = _manifest(model, source, precision, max_prefill, tokenizer)
            top["graphs"] = {}  # the graphs live in the parts
            top["partitions"] = entries
            if optimize:
                from ..artifact import read_manifest

                top["target"] = read_manifest(tmp / entries[0]["directory"], verify=False)["target"]
            manifest = write_manifest(tmp, top)
    return manifest


def _part_manifest(model: Llama4ForCausalLM, source: ModelSource, precision: str, max_prefill: int, layers: range) -> dict:
    entry = _manifest(model, source, precision, max_prefill, {"source": "none", "files": []})
    entry["layers"] = [layers.start, layers.stop]
    return entry
