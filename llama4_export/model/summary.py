"""Architecture arithmetic from a config alone (no weights): parameter counts, weight bytes, KV-cache bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import Llama4Config, Llama4VisionConfig

KV_BYTES = {"bf16": 2, "fp8": 1}
BLOCK_SIZES = (32, 64, 128)  # INT4 values per scale along K that the kernels and graph_passes/quantize.py take


def block_size_problem(block_size: int) -> str | None:
    """Why `--block-size` cannot be an INT4 block (None when it can): export and plan refuse it alike."""
    if block_size in BLOCK_SIZES:
        return None
    return f"--block-size {block_size} is not supported for int4; choose one of: {', '.join(map(str, BLOCK_SIZES))}"
_SCALE_BYTES = 2  # fp16/bf16 per-block INT4 scale
_FP8_SCALE_BYTES = 4  # fp32 per-tensor FP8 scale


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    active: int  # read for one token: everything but the routed experts, plus ONE routed expert per MoE layer
    quantizable: int  # linear weights INT4/FP8 apply to (attention, dense MLP, shared and routed experts)
    quantizable_tensors: int  # how many weight matrices those are (per-tensor FP8 scales; each expert counts)
    embedding: int
    lm_head: int


def _layer_counts(config: Llama4Config, layer: int) -> dict[str, int]:
    h, d = config.hidden_size, config.head_dim
    attn = h * config.num_attention_heads * d * 2 + h * config.num_key_value_heads * d * 2
    counts = {"attention": attn, "norms": 2 * h, "router": 0, "shared": 0, "experts": 0, "one_expert": 0, "dense": 0}
    if config.is_moe_layer(layer):
        one = 3 * h * config.intermediate_size
        counts.update(router=h * config.num_local_experts, shared=one, experts=one * config.num_local_experts, one_expert=one)
    else:
        counts["dense"] = 3 * h * config.intermediate_size_mlp
    return counts


def parameter_counts(config: Llama4Config) -> ParameterCounts:
    embedding = config.vocab_size * config.hidden_size
    lm_head = 0 if config.tie_word_embeddings else embedding
    total = active = embedding + lm_head + config.hidden_size  # + final norm
    quantizable = tensors = 0
    for layer in range(config.num_hidden_layers):
        c = _layer_counts(config, layer)
        common = c["attention"] + c["norms"] + c["router"] + c["shared"] + c["dense"]
        total += common + c["experts"]
        active += common + c["one_expert"]
        quantizable += c["attention"] + c["shared"] + c["dense"] + c["experts"]
        tensors += 4 + 3 * (c["shared"] > 0) + 3 * (c["dense"] > 0) + 2 * config.num_local_experts * (c["experts"] > 0)
    return ParameterCounts(total, active, quantizable, tensors, embedding, lm_head)


def default_block_size(config: Llama4Config) -> int:
    """INT4's default block: 128 values along K (ModelOpt's and llama.cpp's convention), or the largest smaller supported
    size that divides every quantized K when 128 does not (a tiny model), so every block is whole — what the fused
    ONNX Runtime kernels (QMoE) require."""
    inputs = (config.hidden_size, config.intermediate_size, config.intermediate_size_mlp,
              config.num_attention_heads * config.head_dim)
    return next((b for b in sorted(BLOCK_SIZES, reverse=True) if all(k % b == 0 for k in inputs)), max(BLOCK_SIZES))


def weight_bytes(config: Llama4Config) -> dict[str, int]:
    """Bytes of weights per precision, int4 at the export's default block. Router, embeddings, norms and lm_head stay
    bf16 in fp8/int4 (DESIGN.md §5). "int4_onnxruntime" is what the int4 default for ONNX Runtime writes: its graphs
    compute in fp32 (the unquantized tensors and the block scales fp32), lm_head 8-bit and the token embedding 4-bit
    blockwise (pipeline.QuantOptions.spec_for)."""
    p = parameter_counts(config)
    block = default_block_size(config)
    unquantized = (p.total - p.quantizable) * 2
    kept_fp32 = p.total - p.quantizable - p.embedding - p.lm_head  # norms, routers (and any untied float tensor)
    stored_lm_head = p.embedding  # a tied lm_head too: its 8-bit copy beside the 4-bit embedding
    return {
        "bf16": p.total * 2,
        "fp8": unquantized + p.quantizable + p.quantizable_tensors * _FP8_SCALE_BYTES,
        "int4": unquantized + p.quantizable // 2 + p.quantizable // block * _SCALE_BYTES,  # a scale per block of K
        "int4_onnxruntime": kept_fp32 * 4 + p.quantizable // 2 + p.embedding // 2 + stored_lm_head
        + (p.quantizable + p.embedding + stored_lm_head) // block * 4,
    }


def kv_bytes_per_token(config: Llama4Config, dtype: str = "bf16") -> dict[str, Any]:
    per_layer = 2 * config.num_key_value_heads * config.head_dim * KV_BYTES[dtype]  # K and V
    chunked = sum(config.uses_rope(i) for i in range(config.num_hidden_layers))
    global_ = config.num_hidden_layers - chunked
    return {
        "dtype": dtype,
        "per_layer": per_layer,
        # Chunked layers never hold more than one chunk, so past the chunk they cost nothing more per token.
        "chunked": {"layers": chunked, "bytes_per_token": chunked * per_layer, "capped_at_tokens": config.attention_chunk_size},
        "global": {"layers": global_, "bytes_per_token": global_ * per_layer, "capped_at_tokens": None},
        "total": config.num_hidden_layers * per_layer,
    }


def vision_parameter_count(vision: Llama4VisionConfig) -> int:
    """Parameters of the vision encoder, its adapter and the projector (what a multimodal checkpoint adds)."""
    h, i = vision.hidden_size, vision.intermediate_size
    embeddings = vision.num_channels * vision.patch_size**2 * h + h + (vision.patches_per_side**2 + 1) * h
    layer = 4 * (h * h + h) + 2 * h * i + i + h + 4 * h  # attention, MLP, two LayerNorms (weights and biases)
    adapter = i * vision.projector_input_dim + vision.projector_output_dim**2
    projector = vision.vision_output_dim * vision.text_hidden_size
    return embeddings + 4 * h + vision.num_hidden_layers * layer + adapter + projector


def vision_block_size(vision: Llama4VisionConfig, block: int) -> int:
    """The int4 block of the vision linears: the largest supported size up to the text's `block` that divides every
    quantized K (hidden and intermediate size), else the smallest (a last partial block has its own scale)."""
    return next((b for b in sorted(BLOCK_SIZES, reverse=True) if b <= block and
                 vision.hidden_size % b == 0 and vision.intermediate_size % b == 0), min(BLOCK_SIZES))


def vision_weight_bytes(vision: Llama4VisionConfig, precision: str, float_bytes: int, block_size: int = 128) -> int:
    """The tower's weight bytes: every parameter in the graph's float type (`float_bytes`), or with int4 / fp8 the
    encoder layers' linears (q, k, v, o, fc1, fc2) quantized — int4: ½ B per weight + one scale per row and block of K
    (vision_block_size of the text's `block_size`); fp8: 1 B + one scale per matrix — and the rest (patch embedding,
    norms, biases, adapter, projector) in float."""
    total = vision_parameter_count(vision)
    if precision not in ("int4", "fp8"):
        return total * float_bytes
    h, i = vision.hidden_size, vision.intermediate_size
    linears = [(h, h)] * 4 + [(h, i), (i, h)]  # (K, N)
    quantized = vision.num_hidden_layers * sum(k * n for k, n in linears)
    if precision == "int4":
        block = vision_block_size(vision, block_size)
        stored, scales = quantized // 2, vision.num_hidden_layers * sum(n * -(-k // block) for k, n in linears)
    else:
        stored, scales = quantized, vision.num_hidden_layers * len(linears)
    return (total - quantized + scales) * float_bytes + stored


def summarize_vision(vision: Llama4VisionConfig) -> dict[str, Any]:
    params = vision_parameter_count(vision)
    return {
        "params": params,
        "weight_bytes_bf16": params * 2,
        # --vision-precision int4 / fp8 (the rest of the tower 16-bit; int4 at the default block of 128)
        "weight_bytes_fp8": vision_weight_bytes(vision, "fp8", 2),
        "weight_bytes_int4": vision_weight_bytes(vision, "int4", 2),
        "num_hidden_layers": vision.num_hidden_layers,
        "hidden_size": vision.hidden_size,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "pixel_shuffle_ratio": vision.pixel_shuffle_ratio,
        "tokens_per_tile": vision.tokens_per_tile,
    }


def summarize(config: Llama4Config, vision: Llama4VisionConfig | None = None) -> dict[str, Any]:
    """The `inspect` report as one JSON-ready dict (a "vision" entry when the model has a vision encoder)."""
    p = parameter_counts(config)
    layers = [
        {"index": i, "ffn": "moe" if config.is_moe_layer(i) else "dense", "attention": "chunked" if config.uses_rope(i) else "global"}
        for i in range(config.num_hidden_layers)
    ]
    kinds: dict[str, int] = {}
    for layer in layers:
        kind = f"{layer['ffn']}/{layer['attention']}"
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "name": config.name,
        "total_params": p.total,
        "active_params": p.active,
        "embedding_params": p.embedding + p.lm_head,
        "layers": layers,
        "layer_kinds": dict(sorted(kinds.items())),
        "num_experts": config.num_local_experts,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "attention_chunk_size": config.attention_chunk_size,
        "use_qk_norm": config.use_qk_norm,
        "rope_scaling": None if config.rope_scaling is None else "llama3",
        "weight_bytes": weight_bytes(config),
        "kv_bytes_per_token": kv_bytes_per_token(config),
        **({"vision": summarize_vision(vision)} if vision is not None else {}),
    }
