"""The contract between exported graphs and the runtime: input/output names, dtypes and shapes.

Graphs hand the KV cache over in one of two layouts (the manifest's `kv_layout`; a graph's inputs say which):

in_place (ONNX Runtime, unless the cache is FP8) — the graph appends to the cache buffers itself, in place: attention
is com.microsoft.GroupQueryAttention over the valid prefix of each row's buffer.
  input_ids                 int64  [batch, new_tokens]
  positions                 int64  [batch, new_tokens]     absolute positions (RoPE and temperature tuning use them)
  past_lengths_chunked      int64  [batch]                 valid slots at the front of each row's chunked-layer
                                                           buffers; the new tokens go to the slots right after them
  past_lengths_global       int64  [batch]                 the same for the global (NoPE) layers' buffers
  past_key.{i}, past_value.{i}  float [batch, kv_heads, capacity_of_layer_i, head_dim]
  logits_index              (as below)
outputs
  logits                    (as below)
  present_key.{i}, present_value.{i}  the buffers with the new tokens written: bound to the same memory as
                            past_key.{i} / past_value.{i}, so nothing is copied.
  Every new token of a step attends to all valid past slots and causally to the step's tokens; the runtime keeps the
  slots so that this is the sliding policy (runtime/kv_cache.py), which needs a step's tokens inside one chunk and,
  with past tokens, one row per step when new_tokens > 1 (ONNX Runtime's GroupQueryAttention allows no more).
  Every buffer keeps decode_scratch_slots (G − 1, G = query heads per KV head) free slots after a step's tokens: a
  one-row decode step may write scratch copies of its K/V there (graph_passes/decode_attention.py), which the next
  step overwrites.

positions (TensorRT, and FP8 caches) — the graph never writes the cache: it returns the new tokens' K/V and the
runtime writes them where its sliding policy says. Slot order is free because the attention mask is computed from
the positions inputs (DESIGN.md §4).
  input_ids, positions      as above
  past_positions_chunked    int64  [batch, chunk_slots]    absolute position held by each slot of the chunked-layer
                                                           buffers, -1 = empty; shared by every chunked (RoPE) layer
  past_positions_global     int64  [batch, global_slots]   the same for the global (NoPE) layers' window
  past_key.{i}, past_value.{i}  float [batch, kv_heads, slots_of_layer_i, head_dim]
  logits_index              int64  [batch, logits]         prefill only: the token columns whose logits are wanted in
                                                           each row (generation: each row's last token; the accuracy
                                                           report: every column). Decode returns its one token's.
outputs
  logits                    float32 [batch, logits, vocab]   (decode: [batch, 1, vocab])
  new_key.{i}, new_value.{i}    float [batch, kv_heads, new_tokens, head_dim]  (keys after RoPE and QK norm)

Images (an artifact exported from a multimodal checkpoint; manifest `vision`):
  vision.onnx               pixel_values float [tiles, 3, size, size] → image_features float [tiles · tokens_per_tile,
                            text hidden]: every tile's projected features, tile by tile (runtime/images.py's order)
  prefill                   one more input, last: image_features [image_tokens, text hidden] — the features of the
                            step's `<|patch|>` tokens (the vision config's image_token_id) in order, row-major over
                            the batch; zero rows for a step without image tokens. The graph embeds input_ids, puts
                            the k-th feature row in place of the k-th placeholder embedding (early fusion, as
                            transformers' masked_scatter) and goes on as for text. Decode is unchanged.
  Early fusion lives in the prefill because image tokens only ever come in a prompt, never in decode: a separate graph that returns embeddings for the runtime to patch would cost a [tokens, hidden] round trip
  through host memory per step, and `inputs_embeds` instead of input_ids would move the embedding gather (4-bit on
  ONNX Runtime) out of the graph. A text-only step binds zero rows: the merge costs a CumSum over the step's ids and
  a Gather + Where over its embeddings, nothing beside one layer. Artifacts of text-only checkpoints have no such
  input at all, and their graphs are byte for byte what they were.

A partitioned artifact (--partitions N) cuts this interface at layer boundaries: part k takes the past K/V of its
own layers only; every part but the first takes `hidden_states` [batch, new_tokens, hidden] instead of input_ids,
and every part but the last returns `hidden_states_out` instead of logits.
"""

from __future__ import annotations

from collections.abc import Collection

from ..model.config import Llama4Config

# The most new tokens one prefill call takes unless the export says otherwise (manifest graphs.prefill.max_new_tokens).
DEFAULT_MAX_PREFILL = 512
# Sink tokens a global layer's window keeps forever once the sequence outgrows it (runtime/kv_cache.py).
DEFAULT_SINKS = 4

INPUT_IDS = "input_ids"
POSITIONS = "positions"
PAST_POSITIONS = {"chunked": "past_positions_chunked", "global": "past_positions_global"}
PAST_LENGTHS = {"chunked": "past_lengths_chunked", "global": "past_lengths_global"}
SLOT_DIMS = {"chunked": "chunk_slots", "global": "global_slots"}  # the cache buffers' symbolic slot dimension
KV_LAYOUTS = ("in_place", "positions")
LOGITS = "logits"
LOGITS_INDEX = "logits_index"
HIDDEN_IN = "hidden_states"
HIDDEN_OUT = "hidden_states_out"
IMAGE_FEATURES = "image_features"
PIXEL_VALUES = "pixel_values"


def attention_kind(config: Llama4Config, layer: int) -> str:
    return "chunked" if config.uses_rope(layer) else "global"


def decode_scratch_slots(config: Llama4Config) -> int:
    """In-place slots a step may write after its own tokens, in every layer's buffer (the in_place contract above)."""
    return config.num_kv_groups - 1


def past_key(layer: int) -> str:
    return f"past_key.{layer}"


def past_value(layer: int) -> str:
    return f"past_value.{layer}"


def new_key(layer: int) -> str:
    return f"new_key.{layer}"


def new_value(layer: int) -> str:
    return f"new_value.{layer}"


def present_key(layer: int) -> str:
    return f"present_key.{layer}"


def present_value(layer: int) -> str:
    return f"present_value.{layer}"


def kv_layout_of(input_names: Collection[str]) -> str:
    """The layout of a graph with these inputs."""
    return "in_place" if PAST_LENGTHS["global"] in input_names else "positions"


def takes_logits_index(config: Llama4Config, layers: range, new_tokens: int | None) -> bool:
    """A prefill graph (dynamic new tokens) that ends with the lm_head."""
    return new_tokens is None and layers.stop == config.num_hidden_layers


def takes_image_features(layers: range, new_tokens: int | None, vision: bool) -> bool:
    """The prefill graph (of the first part) of an artifact with a vision graph."""
    return vision and new_tokens is None and layers.start == 0


def input_names(config: Llama4Config, layers: range | None = None, new_tokens: int | None = 1,
                layout: str = "positions", vision: bool = False) -> list[str]:
    layers = range(config.num_hidden_layers) if layers is None else layers
    cache_index = PAST_LENGTHS if layout == "in_place" else PAST_POSITIONS
    names = [INPUT_IDS if layers.start == 0 else HIDDEN_IN, POSITIONS, cache_index["chunked"], cache_index["global"]]
    for i in layers:
        names += [past_key(i), past_value(i)]
    names += [LOGITS_INDEX] if takes_logits_index(config, layers, new_tokens) else []
    return names + ([IMAGE_FEATURES] if takes_image_features(layers, new_tokens, vision) else [])


def output_names(config: Llama4Config, layers: range | None = None, layout: str = "positions") -> list[str]:
    layers = range(config.num_hidden_layers) if layers is None else layers
    names = [LOGITS if layers.stop == config.num_hidden_layers else HIDDEN_OUT]
    key, value = (present_key, present_value) if layout == "in_place" else (new_key, new_value)
    for i in layers:
        names += [key(i), value(i)]
    return names
