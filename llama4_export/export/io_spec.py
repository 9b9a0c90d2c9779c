"""The contract between exported graphs and the runtime: input/output names, dtypes and shapes.

Every graph (decode and prefill, for ONNX Runtime and TensorRT) has the same interface:

inputs
  input_ids                 int64  [batch, new_tokens]
  positions                 int64  [batch, new_tokens]     absolute positions (RoPE and temperature tuning use them)
  past_positions_chunked    int64  [batch, chunk_slots]    absolute position held by each slot of the chunked-layer
                                                           buffers, -1 = empty; shared by every chunked (RoPE) layer
  past_positions_global     int64  [batch, global_slots]   the same for the global (NoPE) layers' window
  past_key.{i}, past_value.{i}  float [batch, kv_heads, slots_of_layer_i, head_dim]
outputs
  logits                    float32 [batch, new_tokens, vocab]
  new_key.{i}, new_value.{i}    float [batch, kv_heads, new_tokens, head_dim]  (keys after RoPE and QK norm)

The graph never writes the cache: the runtime owns the buffers and writes the new K/V where its sliding policy says.
Slot order is free because the attention mask is computed from the positions inputs (DESIGN.md §4).
"""

from __future__ import annotations

from ..model.config import Llama4Config

INPUT_IDS = "input_ids"
POSITIONS = "positions"
PAST_POSITIONS = {"chunked": "past_positions_chunked", "global": "past_positions_global"}
LOGITS = "logits"


def attention_kind(config: Llama4Config, layer: int) -> str:
    return "chunked" if config.uses_rope(layer) else "global"


def past_key(layer: int) -> str:
    return f"past_key.{layer}"


def past_value(layer: int) -> str:
    return f"past_value.{layer}"


def new_key(layer: int) -> str:
    return f"new_key.{layer}"


def new_value(layer: int) -> str:
    return f"new_value.{layer}"


def input_names(config: Llama4Config) -> list[str]:
    names = [INPUT_IDS, POSITIONS, PAST_POSITIONS["chunked"], PAST_POSITIONS["global"]]
    for i in range(config.num_hidden_layers):
        names += [past_key(i), past_value(i)]
    return names


def output_names(config: Llama4Config) -> list[str]:
    names = [LOGITS]
    for i in range(config.num_hidden_layers):
        names += [new_key(i), new_value(i)]
    return names
