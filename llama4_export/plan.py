"""GPU memory planner: what a Llama 4 config needs on one GPU or N, and the largest global KV window W that fits.

    plan = plan_memory(get_preset("scout"), "int4", GPUS["h100-80gb"].memory_bytes)
    plan.window, plan.fits, plan.per_gpu[0].total_bytes
    partition_layers(get_preset("maverick"), 8, "fp8")      # contiguous layer ranges, balanced by weight bytes

Pure arithmetic on the config (no weights, no GPU). Per GPU:

  weights    model/summary.py's formulas, layer by layer: bf16/fp16 = 2 B per parameter, fp32 = 4 B; int4 = ½ B per
             quantizable parameter + one 2-byte scale per `block_size` of them; fp8 = 1 B per quantizable parameter +
             a 4-byte scale per weight matrix. Quantizable = what graph_passes/quantize.py QuantSpec.wants takes:
             q/k/v/o, dense MLP, shared and routed experts. Router, embeddings, norms and lm_head stay in the graph's
             float dtype: 16-bit (as summary.py counts them), 32-bit in an fp32 graph (int4 scales too). The embedding
             sits on the first GPU, the final norm and lm_head on the last. int4 / fp8 are planned as 16-bit
             graphs, what the pipeline exports for tensorrt (pipeline.graph_dtype).
  KV cache   2 (K, V) × kv_heads × head_dim × kv-dtype bytes per token per layer, × max_batch. Chunked (RoPE)
             layers hold attention_chunk_size slots, global (NoPE) layers hold W slots (runtime/kv_cache.py).
  workspace  the peak of one prefill call of max_prefill tokens (the biggest transient set; decode is a 1-token
             prefill), with the graphs as exported — attention is standard ops (graph_passes/fuse_transformer.py),
             so the fp32 scores are materialized:
               hidden    HIDDEN_COPIES × B·T·hidden × act   (residual, normed input, sublayer output, their sum)
               attention B·T·(heads + 2·kv_heads)·head_dim × act                (q, k, v)
                         + 2 × B·heads·T·(S + T) × 4                           (fp32 scores and probabilities)
                         + 3 × B·kv_heads·(S + T)·head_dim × kv                (past ⧺ new keys, values, keys transposed)
                           with S = the layer's cache slots (chunk or W); the largest layer kind on the GPU counts
               ffn       MoE: 2 × B·T·3·intermediate × act (shared + routed expert: gate, up, product);
                         dense: B·T·3·intermediate_mlp × act — attention and FFN run one after the other: max of both
               new K/V   the step's new keys/values of every layer on the GPU: layers × 2·B·kv_heads·T·head_dim × kv
               logits    B·T·vocab × 4 (fp32, every prefill token; last GPU only)
  vision     (a multimodal model: Scout's and Maverick's towers) on the first GPU: the encoder, adapter and projector
             weights (model/summary.py vision_weight_bytes) at `vision_precision` — default: the text graphs' float
             dtype, export's default tower for tensorrt; int4 / fp8 towers compute in fp16 — and the
             encode of `max_tiles` tiles (one Scout image: 16 tiles + the global one), which runs before the prefill:
               hidden    HIDDEN_COPIES × n·vision_hidden × act            (n = tiles·(patches + 1): patches + class)
               attention 3 × n·vision_hidden × act (q, k, v) + 2 × tiles·heads·(patches + 1)² × 4 (fp32 scores, per tile)
               mlp       2 × n·vision_intermediate × act                  (fc1 out, GELU out) — max of attention and mlp
               features  tiles·tokens_per_tile·text_hidden × act          (the projected features the prefill takes,
                                                                           counted in the prefill's workspace as well)
             The GPU's workspace is the larger of the prefill's and the encode's.
  reserve    RUNTIME_RESERVE per GPU: CUDA context (~0.5 GiB on Hopper), cuBLAS / TensorRT / ONNX Runtime
             workspaces and allocator slack; Jetson adds the memory its CPU and OS take from the shared pool.

The model fits when everything fits with W = one attention chunk (so the global layers see at least what the
chunked layers see); `window` is the largest W that fits, at most the model's context.
"""

from __future__ import annotations

import math
import re
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConfigError
from .model.config import Llama4Config, Llama4VisionConfig
from .model.io_spec import DEFAULT_MAX_PREFILL, DEFAULT_SINKS, attention_kind
from .model.summary import (_layer_counts, block_size_problem, default_block_size, vision_parameter_count,
                            vision_weight_bytes)

MIB, GIB = 1 << 20, 1 << 30
RUNTIME_RESERVE = 2 * GIB
HIDDEN_COPIES = 4
SCORE_BUFFERS = 2  # an elementwise op's fp32 input and output are alive together (mask → softmax)
KV_COPIES = 3  # concatenated keys and values, and the keys transposed for Q·Kᵀ
DEFAULT_BLOCK_SIZE = 128
DEFAULT_MAX_TILES = 17  # one image at Scout's and Maverick's max_patches 16, plus its global thumbnail tile

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int4")
KV_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}
_INT4_SCALE_BYTES = 2  # summary.weight_bytes: a 16-bit scale per block
_FP8_SCALE_BYTES = 4  # summary.weight_bytes: an fp32 scale per weight matrix


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: int  # total device memory as nvidia-smi / cudaMemGetInfo report it
    reserve_bytes: int = RUNTIME_RESERVE


GPUS = {
    g.name: g for g in (
        GpuSpec("h100-80gb", 81559 * MIB),
        GpuSpec("h200-141gb", 143771 * MIB),
        GpuSpec("l40s-48gb", 46068 * MIB),
        GpuSpec("a100-40gb", 40960 * MIB),
        GpuSpec("rtx4090-24gb", 24564 * MIB),
        # 64 GiB LPDDR5 shared with the CPU: the OS and the host side of the runtime keep ~8 GiB of it.
        GpuSpec("jetson-orin-64gb", 64 * GIB, RUNTIME_RESERVE + 8 * GIB),
    )
}

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-z]+)\s*$", re.IGNORECASE)


def parse_memory_size(text: str) -> int:
    """'24GB' (10⁹), '80GiB' (2³⁰), '512 MiB', '1.5TB' → bytes."""
    match = _SIZE.match(text)
    unit = match and _UNITS.get(match.group(2).lower())
    if not unit:
        raise ConfigError(f"--gpu-memory {text!r}: expected a number with a unit, e.g. 24GB or 80GiB "
                          f"(units: {', '.join(u.upper().replace('I', 'i') for u in _UNITS)})")
    size = int(float(match.group(1)) * unit)
    if size <= 0:
        raise ConfigError(f"--gpu-memory {text!r}: must be more than 0 bytes")
    return size


def gpu_spec(name: str | None = None, memory: str | None = None) -> GpuSpec:
    """A known GPU by name, or a custom size (--gpu-memory) with the default runtime reserve."""
    if (name is None) == (memory is None):
        raise ConfigError("give exactly one of --gpu NAME or --gpu-memory SIZE (e.g. --gpu h100-80gb or --gpu-memory 24GB)")
    if memory is not None:
        return GpuSpec(f"{memory.strip()} GPU", parse_memory_size(memory))
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ConfigError(f"--gpu {name!r} is unknown; choose one of: {', '.join(GPUS)} (or give --gpu-memory SIZE)") from None


# ------------------------------------------------------------------------------------------------ weights
def _check_precision(precision: str, flag: str = "precision") -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"{flag} {precision!r} is unknown; choose one of: {', '.join(PRECISIONS)}")


def activation_dtype_for(precision: str, activation_dtype: str | None = None) -> str:
    """The graph's float dtype: given, or fp32 for fp32 weights and 16-bit for the rest (the GPU deployment)."""
    _check_precision(precision)
    dtype = activation_dtype or ("fp32" if precision == "fp32" else "fp16")
    if dtype not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"activation dtype {dtype!r} is unknown; choose fp32, fp16 or bf16")
    return dtype


def layer_weight_bytes(config: Llama4Config, layer: int, precision: str, block_size: int = DEFAULT_BLOCK_SIZE,
                       activation_dtype: str | None = None) -> int:
    """One decoder layer's weight bytes (summary.weight_bytes' formulas, for this layer only). Unquantized tensors
    and int4 scales are stored in the graph's float dtype: 2 bytes as in summary.py, 4 in an fp32 graph."""
    wide = KV_DTYPE_BYTES[activation_dtype_for(precision, activation_dtype)]
    c = _layer_counts(config, layer)
    quantizable = c["attention"] + c["shared"] + c["dense"] + c["experts"]
    unquantized = c["norms"] + c["router"]
    if precision in ("fp32", "fp16", "bf16"):
        return (quantizable + unquantized) * KV_DTYPE_BYTES[precision]
    if precision == "int4":
        scale = _INT4_SCALE_BYTES * wide // 2
        return unquantized * wide + quantizable // 2 + (quantizable // block_size) * scale
    # fp8: q, k, v, o; gate, up, down of the shared expert and of the dense MLP; gate_up and down of every expert
    matrices = 4 + 3 * (c["shared"] > 0) + 3 * (c["dense"] > 0) + 2 * config.num_local_experts * (c["experts"] > 0)
    return unquantized * wide + quantizable + matrices * _FP8_SCALE_BYTES


def edge_weight_bytes(config: Llama4Config, precision: str, activation_dtype: str | None = None) -> tuple[int, int]:
    """(first GPU: the embedding; last GPU: final norm + lm_head), never quantized: in the graph's float dtype."""
    per = KV_DTYPE_BYTES[precision] if precision in ("fp32", "fp16", "bf16") else \
        KV_DTYPE_BYTES[activation_dtype_for(precision, activation_dtype)]
    embedding = config.vocab_size * config.hidden_size
    lm_head = 0 if config.tie_word_embeddings else embedding
    return embedding * per, (config.hidden_size + lm_head) * per


def partition_layers(config: Llama4Config, n: int, precision: str = "bf16", block_size: int = DEFAULT_BLOCK_SIZE,
                     activation_dtype: str | None = None) -> list[range]:
    """Split the decoder stack into n contiguous, non-empty layer ranges minimizing the largest part's weight bytes
    (the embedding counts on the first part, final norm + lm_head on the last). Ties go to the earliest cut.

    The layout `--gpus N` plans and `--partitions N` exports: part k runs on cuda:k with its own KV cache."""
    layers = config.num_hidden_layers
    if not 1 <= n <= layers:
        raise ConfigError(f"{n} partitions for {layers} layers: need between 1 and {layers} (one layer at least each)")
    first, last = edge_weight_bytes(config, precision, activation_dtype)
    prefix = [0]
    for i in range(layers):
        prefix.append(prefix[-1] + layer_weight_bytes(config, i, precision, block_size, activation_dtype))

    def part(k: int, start: int, stop: int) -> int:  # bytes of part k holding layers start..stop-1
        return prefix[stop] - prefix[start] + (first if k == 0 else 0) + (last if k == n - 1 else 0)

    # best[k][j]: the smallest possible largest part when parts 0..k hold layers 0..j-1; cut[k][j]: where part k starts
    best = [[math.inf] * (layers + 1) for _ in range(n)]
    cut = [[0] * (layers + 1) for _ in range(n)]
    for j in range(1, layers + 1):
        best[0][j] = part(0, 0, j)
    for k in range(1, n):
        for j in range(k + 1, layers + 1):
            for start in range(k, j):
                cost = max(best[k - 1][start], part(k, start, j))
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, start
    ranges, stop = [], layers
    for k in range(n - 1, 0, -1):
        start = cut[k][stop]
        ranges.append(range(start, stop))
        stop = start
    ranges.append(range(0, stop))
    return ranges[::-1]


# ------------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class GpuUse:
    """One GPU's share at the planned window: bytes by kind."""

    index: int
    layers: tuple[int, int]  # decoder layers start..stop-1 on this GPU
    weight_bytes: int
    kv_chunked_bytes: int
    kv_global_bytes: int
    workspace: dict[str, int]  # hidden, attention, ffn (max of the two counts), new_kv, logits, image_features, vision
    reserve_bytes: int
    memory_bytes: int
    vision_weight_bytes: int = 0  # the vision tower on the first GPU of a multimodal model

    @property
    def workspace_bytes(self) -> int:
        """The larger of one prefill call's transient set and one image encode's (they never run together)."""
        w = self.workspace
        prefill = w["hidden"] + max(w["attention"], w["ffn"]) + w["new_kv"] + w["logits"] + w["image_features"]
        return max(prefill, w["vision"])

    @property
    def total_bytes(self) -> int:
        return (self.weight_bytes + self.vision_weight_bytes + self.kv_chunked_bytes + self.kv_global_bytes
                + self.workspace_bytes + self.reserve_bytes)

    @property
    def free_bytes(self) -> int:
        return self.memory_bytes - self.total_bytes

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "layers": list(self.layers), "workspace_bytes": self.workspace_bytes,
                "total_bytes": self.total_bytes, "free_bytes": self.free_bytes}


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    precision: str
    kv_dtype: str
    activation_dtype: str
    gpu: str
    gpu_memory_bytes: int  # per GPU
    gpus: int
    max_batch: int
    max_prefill: int
    weight_bytes: int  # all GPUs together, the vision tower's included
    kv_bytes_per_token: dict[str, Any]  # per layer, and per kind: layers, slots (as in per_gpu), bytes per token (one sequence)
    min_window: int  # the W the model must reach to fit: one attention chunk (at most the context)
    window: int  # the largest global window W that fits on every GPU (0: not even sinks + 1 slots), or the W asked
    window_limit: str  # what bounds `window`: "memory", "context" (the whole context fits) or "requested"
    fits: bool
    missing_bytes: int  # on the fullest GPU, at the W per_gpu shows; 0 when it fits
    per_gpu: list[GpuUse] = field(default_factory=list)  # at W = window when it fits or was asked, else at min_window
    vision: dict[str, Any] | None = None  # the vision tower's share (first GPU): params, weight_bytes, max_tiles, encode

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["per_gpu"] = [g.to_json() for g in self.per_gpu]
        return data


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: must be at least 1")


def vision_encode_bytes(vision: Llama4VisionConfig, tiles: int, act_bytes: int) -> dict[str, int]:
    """The transient set of one encode of `tiles` tiles (module docstring, "vision"), by part."""
    per_tile = vision.patches_per_side**2 + 1
    n, h = tiles * per_tile, vision.hidden_size
    return {
        "hidden": HIDDEN_COPIES * n * h * act_bytes,
        "attention": 3 * n * h * act_bytes + SCORE_BUFFERS * tiles * vision.num_attention_heads * per_tile**2 * 4,
        "mlp": 2 * n * vision.intermediate_size * act_bytes,
        "features": tiles * vision.tokens_per_tile * vision.text_hidden_size * act_bytes,
    }


def _gpu_use(config: Llama4Config, index: int, layers: range, n: int, window: int, precision: str, kv_bytes: int,
             activation_dtype: str, batch: int, tokens: int, gpu: GpuSpec, block_size: int,
             vision: Llama4VisionConfig | None, max_tiles: int, vision_precision: str) -> GpuUse:
    act_bytes = KV_DTYPE_BYTES[activation_dtype]
    # the vision graph's float type, by the text's rule: int4 / fp8 compute in 16-bit (pipeline.graph_dtype)
    vision_act = KV_DTYPE_BYTES[activation_dtype_for(vision_precision)]
    h, d, kvh, heads = config.hidden_size, config.head_dim, config.num_key_value_heads, config.num_attention_heads
    b, t = batch, tokens
    per_layer_token = 2 * kvh * d * kv_bytes * b
    slots = {"chunked": config.attention_chunk_size or window, "global": window}
    kinds = [("chunked" if config.uses_rope(i) else "global", "moe" if config.is_moe_layer(i) else "dense") for i in layers]
    attention = {
        kind: b * t * (heads + 2 * kvh) * d * act_bytes
        + SCORE_BUFFERS * b * heads * t * (slots[kind] + t) * 4
        + KV_COPIES * b * kvh * (slots[kind] + t) * d * kv_bytes
        for kind in slots
    }
    ffn = {"moe": 2 * b * t * 3 * config.intermediate_size * act_bytes,
           "dense": b * t * 3 * config.intermediate_size_mlp * act_bytes}
    first, last = edge_weight_bytes(config, precision, activation_dtype)
    weights = sum(layer_weight_bytes(config, i, precision, block_size, activation_dtype) for i in layers)
    weights += (first if index == 0 else 0) + (last if index == n - 1 else 0)
    count = {kind: sum(a == kind for a, _ in kinds) for kind in slots}
    encode = vision_encode_bytes(vision, max_tiles, vision_act) if vision is not None and index == 0 else None
    return GpuUse(
        index=index, layers=(layers.start, layers.stop), weight_bytes=weights,
        kv_chunked_bytes=count["chunked"] * per_layer_token * slots["chunked"],
        kv_global_bytes=count["global"] * per_layer_token * slots["global"],
        workspace={
            "hidden": HIDDEN_COPIES * b * t * h * act_bytes,
            "attention": max(attention[a] for a, _ in kinds),
            "ffn": max(ffn[f] for _, f in kinds),
            "new_kv": len(layers) * 2 * b * kvh * t * d * kv_bytes,
            "logits": b * t * config.vocab_size * 4 if index == n - 1 else 0,
            "image_features": encode["features"] if encode else 0,
            "vision": encode["hidden"] + max(encode["attention"], encode["mlp"]) + encode["features"] if encode else 0,
        },
        reserve_bytes=gpu.reserve_bytes, memory_bytes=gpu.memory_bytes,
        vision_weight_bytes=vision_weight_bytes(vision, vision_precision, vision_act, block_size) if encode else 0,
    )


def plan_memory(
    config: Llama4Config, precision: str, gpu_memory_bytes: int | GpuSpec, gpus: int = 1, max_batch: int = 1,
    max_prefill: int = DEFAULT_MAX_PREFILL, kv_dtype: str | None = None, activation_dtype: str | None = None,
    window: int | None = None, sinks: int = DEFAULT_SINKS, block_size: int | None = None,
    vision: Llama4VisionConfig | None = None, max_tiles: int | None = None, vision_precision: str | None = None,
) -> MemoryPlan:
    """Weights, KV cache and workspace per GPU, and the largest global window W that fits (or the `window` given).

    gpu_memory_bytes: one GPU's memory (runtime reserve RUNTIME_RESERVE) or a GpuSpec. gpus > 1 splits the layers
    with partition_layers. activation_dtype: default fp32 for fp32 weights, else 16-bit. kv_dtype: default what the
    graphs cache (bf16 for bf16 weights, else the activation dtype); fp8 only with quantized weights, as export's --kv-cache-dtype. vision:
    the model's vision tower (None: text only), planned on the first GPU with an encode of `max_tiles` (default
    DEFAULT_MAX_TILES) image tiles at a time; vision_precision: its precision (None: the text graphs' float type).
    block_size: int4's values per scale (None: the export's default_block_size; refused as export refuses it, for a
    size int4 does not have or without int4 weights).
    """
    activation_dtype = activation_dtype_for(precision, activation_dtype)
    kv_dtype = kv_dtype or ("bf16" if precision == "bf16" else activation_dtype)
    if kv_dtype not in KV_DTYPE_BYTES:
        raise ConfigError(f"--kv-dtype {kv_dtype!r} is unknown; choose one of: {', '.join(KV_DTYPE_BYTES)}")
    if kv_dtype == "fp8" and precision not in ("fp8", "int4"):
        raise ConfigError(f"--kv-dtype fp8: an FP8 KV cache takes calibrated scales, exported with --precision fp8 / "
                          f"int4 (--kv-cache-dtype fp8), not {precision}; drop it or change --precision")
    if max_tiles is not None and vision is None:
        raise ConfigError(f"--max-tiles {max_tiles}: no vision tower is planned (a text-only model, or --text-only); "
                          "drop one")
    max_tiles = DEFAULT_MAX_TILES if max_tiles is None else max_tiles
    if block_size is None:
        block_size = default_block_size(config)
    elif "int4" not in (precision, vision_precision):
        raise ConfigError(f"--block-size {block_size} applies to int4 weights only ({precision} uses per-tensor "
                          "scales); drop it")
    elif (problem := block_size_problem(block_size)) is not None:
        raise ConfigError(problem)
    _check_positive(gpus=gpus, max_batch=max_batch, max_prefill=max_prefill, max_tiles=max_tiles)
    if vision_precision is not None:
        if vision is None:
            raise ConfigError(f"--vision-precision {vision_precision}: no vision tower is planned (a text-only model, "
                              "or --text-only); drop one")
        _check_precision(vision_precision, "--vision-precision")
    vision_precision = vision_precision or activation_dtype
    gpu = gpu_memory_bytes if isinstance(gpu_memory_bytes, GpuSpec) else \
        GpuSpec(f"{gpu_memory_bytes:,} B GPU", int(gpu_memory_bytes))
    context = config.max_position_embeddings
    smallest = sinks + 1  # the sliding window's minimum: S sinks + a ring of one
    if window is not None and not smallest <= window <= context:
        raise ConfigError(f"--window {window}: must be between sinks + 1 = {smallest} and the context {context:,}")
    parts = partition_layers(config, gpus, precision, block_size, activation_dtype)
    kv_bytes = KV_DTYPE_BYTES[kv_dtype]

    def uses(w: int) -> list[GpuUse]:
        return [_gpu_use(config, k, r, gpus, w, precision, kv_bytes, activation_dtype, max_batch, max_prefill, gpu, block_size,
                         vision, max_tiles, vision_precision)
                for k, r in enumerate(parts)]

    def fits_at(w: int) -> bool:
        return all(u.free_bytes >= 0 for u in uses(w))

    min_window = max(smallest, min(config.attention_chunk_size or context, context))
    if window is not None:
        best, limit = window, "requested"
        fits = fits_at(window)
    elif fits_at(context):
        best, limit, fits = context, "context", True
    else:
        # total(W) only grows with W: the largest fitting W by bisection (0 when not even `smallest` fits)
        low, high = smallest - 1, context  # invariant: low fits (or is the sentinel), high does not
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits_at(mid) else (low, mid)
        best = low if low >= smallest else 0
        limit, fits = "memory", best >= min_window
    shown_window = best if fits or limit == "requested" else max(best, min_window)
    shown = uses(shown_window)
    missing = 0 if fits else max(-u.free_bytes for u in shown)
    per_layer = 2 * config.num_key_value_heads * config.head_dim * kv_bytes
    chunked = sum(config.uses_rope(i) for i in range(config.num_hidden_layers))
    kv = {
        "per_layer": per_layer,
        "chunked": {"layers": chunked, "slots": config.attention_chunk_size or shown_window,
                    "bytes_per_token": chunked * per_layer},
        "global": {"layers": config.num_hidden_layers - chunked, "slots": shown_window,
                   "bytes_per_token": (config.num_hidden_layers - chunked) * per_layer},
        "total": config.num_hidden_layers * per_layer,
    }
    return MemoryPlan(
        model=config.name, precision=precision, kv_dtype=kv_dtype, activation_dtype=activation_dtype, gpu=gpu.name,
        gpu_memory_bytes=gpu.memory_bytes,
        gpus=gpus, max_batch=max_batch, max_prefill=max_prefill, weight_bytes=sum(u.weight_bytes + u.vision_weight_bytes for u in shown),
        kv_bytes_per_token=kv, min_window=min_window, window=best, window_limit=limit, fits=fits,
        missing_bytes=max(missing, 0), per_gpu=shown,
        vision=None if vision is None else {
            "params": vision_parameter_count(vision), "precision": vision_precision,
            "weight_bytes": shown[0].vision_weight_bytes, "max_tiles": max_tiles,
            "tokens_per_tile": vision.tokens_per_tile, "encode_workspace_bytes": shown[0].workspace["vision"]},
    )


# ------------------------------------------------------------------------------------------------ the runtime's W
FLOAT_DTYPES = {4: "fp32", 2: "fp16"}  # the runtime's cache itemsize → dtype name


def planned_window(config: Llama4Config, precision: str, gpu_memory_bytes: int, float_itemsize: int,
                   max_batch: int = 1, max_prefill: int = DEFAULT_MAX_PREFILL, sinks: int = DEFAULT_SINKS,
                   vision: Llama4VisionConfig | None = None, vision_precision: str | None = None) -> int:
    """The default global window on a GPU: plan_memory's largest W for an artifact whose graphs compute (and cache
    K/V) in `float_itemsize`-byte floats, with its vision graph (at `vision_precision`) when it has one. Raises
    ConfigError when not even sinks + 1 slots fit."""
    dtype = FLOAT_DTYPES.get(float_itemsize)
    if dtype is None:
        raise ConfigError(f"a {float_itemsize}-byte KV cache has no plan; the runtime caches fp32 or fp16")
    plan = plan_memory(config, precision, gpu_memory_bytes, max_batch=max_batch, max_prefill=max_prefill,
                       kv_dtype=dtype, activation_dtype=dtype, sinks=sinks, vision=vision,
                       vision_precision=vision_precision)
    if plan.window == 0:
        raise ConfigError(f"{config.name} {precision} does not fit in this GPU's {gpu_memory_bytes / GIB:,.2f} GiB "
                          f"({plan.missing_bytes / GIB:,.2f} GiB missing; see `llama4-export plan`); use more GPUs or a "
                          "smaller precision")
    return plan.window


def cuda_memory_bytes(device: int = 0) -> int | None:
    """Total memory of CUDA device `device` as nvidia-smi reports it (the driver ships it); None without a GPU."""
    try:
        out = subprocess.run(["nvidia-smi", f"--id={device}", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return int(out.split()[0]) * MIB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


# The runtime's default window on the CPU is the model's whole context, capped so one sequence's global-layer cache
# stays under this.
DEFAULT_GLOBAL_CACHE_BYTES = 1 << 30


def default_window(config: Llama4Config, itemsize: int = 4, budget_bytes: int = DEFAULT_GLOBAL_CACHE_BYTES) -> int:
    """The whole context (max_position_embeddings), capped so the global layers' K/V of one sequence fit the budget."""
    global_layers = sum(attention_kind(config, i) == "global" for i in range(config.num_hidden_layers))
    per_token = 2 * global_layers * config.num_key_value_heads * config.head_dim * itemsize
    cap = budget_bytes // per_token if per_token else config.max_position_embeddings
    return int(max(DEFAULT_SINKS + 1, min(config.max_position_embeddings, cap)))
