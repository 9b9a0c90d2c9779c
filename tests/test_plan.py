"""Memory planner (`llama4-export plan`, llama4_export/plan.py) against a hand computation from config fields.

The hand model below restates the planner's documented formulas (plan.py docstring) from the config alone: weight
bytes from parameter counts, KV bytes per token, the prefill workspace, the 2 GiB runtime reserve. For a GPU that
holds a global layer and W ≥ one chunk, everything is linear in W, so the largest W is a floor division.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from llama4_export.tensorrt.profiles import build_limits
from llama4_export import api
from llama4_export.cli.export import export_app
from llama4_export.errors import ConfigError
from llama4_export.weights import from_preset
from llama4_export.model import get_preset
from llama4_export.model.config import get_vision_preset
from llama4_export.plan import partition_layers, plan_memory, planned_window
from llama4_export.export.onnx_export import VISION_FILE
from llama4_export.pipeline import write_vision_graph
from llama4_export.runtime.images import ImageProcessorConfig
from llama4_export.weights import CheckpointWeights
from llama4_export.runtime import Generator, default_window
from llama4_export.evaluation.torch_backend import TorchBackend

MIB, GIB = 2**20, 2**30
H100 = 81559 * MIB  # nvidia-smi's memory.total for an H100 80GB HBM3
RESERVE = 2 * GIB


def hand_layer(cfg, i: int) -> tuple[int, int, int]:
    """(quantizable parameters, unquantized parameters, weight matrices) of layer i."""
    h, d = cfg.hidden_size, cfg.head_dim
    attention = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)  # q, o; k, v
    if i in cfg.moe_layers:
        expert = 3 * h * cfg.intermediate_size
        return attention + expert * (1 + cfg.num_local_experts), 2 * h + h * cfg.num_local_experts, 4 + 3 + 2 * cfg.num_local_experts
    return attention + 3 * h * cfg.intermediate_size_mlp, 2 * h, 4 + 3


def hand_weights(cfg, layers, precision: str, first: bool, last: bool, wide: int = 2) -> int:
    q = sum(hand_layer(cfg, i)[0] for i in layers)
    u = sum(hand_layer(cfg, i)[1] for i in layers)
    m = sum(hand_layer(cfg, i)[2] for i in layers)
    u += cfg.vocab_size * cfg.hidden_size * first + (cfg.vocab_size * cfg.hidden_size + cfg.hidden_size) * last
    return {"fp32": 4 * (q + u), "fp16": 2 * (q + u), "bf16": 2 * (q + u),
            "int4": wide * u + q // 2 + (q // 128) * wide, "fp8": wide * u + q + 4 * m}[precision]


def hand_gpu(cfg, layers, window: int, weights: int, last: bool, act: int = 2, kv: int = 2, tokens: int = 512,
             batch: int = 1) -> int:
    """Bytes one GPU needs at global window `window` (≥ the chunk; the GPU holds a global layer)."""
    h, d, kvh, heads, t, b = cfg.hidden_size, cfg.head_dim, cfg.num_key_value_heads, cfg.num_attention_heads, tokens, batch
    per_token_layer = 2 * kvh * d * kv * b
    n_global = sum(cfg.no_rope_layers[i] == 0 for i in layers)
    assert n_global and window >= cfg.attention_chunk_size
    cache = (len(layers) - n_global) * per_token_layer * cfg.attention_chunk_size + n_global * per_token_layer * window
    attention = b * t * (heads + 2 * kvh) * d * act + 2 * b * heads * t * (window + t) * 4 + 3 * b * kvh * (window + t) * d * kv
    assert attention > 2 * b * t * 3 * max(cfg.intermediate_size, cfg.intermediate_size_mlp) * act  # attention is the peak
    workspace = 4 * b * t * h * act + attention + len(layers) * 2 * b * kvh * t * d * kv + b * t * cfg.vocab_size * 4 * last
    return weights + cache + workspace + RESERVE


def hand_window(cfg, layers, memory: int, weights: int, last: bool, **kw) -> int:
    slope = hand_gpu(cfg, layers, cfg.attention_chunk_size + 1, weights, last, **kw) - hand_gpu(
        cfg, layers, cfg.attention_chunk_size, weights, last, **kw)
    return (memory - hand_gpu(cfg, layers, cfg.attention_chunk_size, weights, last, **kw)) // slope + cfg.attention_chunk_size


def plan_cli(*args: str):
    return CliRunner().invoke(export_app, ["plan", *args])


# ------------------------------------------------------------------------------------------------ numbers
def test_scout_int4_on_h100_matches_the_hand_computation():
    cfg = get_preset("scout")
    weights = hand_weights(cfg, range(48), "int4", True, True)
    assert weights == 58_646_538_240
    window = hand_window(cfg, range(48), H100, weights, True)
    plan = plan_memory(cfg, "int4", H100)
    assert plan.weight_bytes == weights
    assert plan.kv_bytes_per_token["total"] == 196_608  # DESIGN.md §4
    assert plan.kv_bytes_per_token["global"]["bytes_per_token"] == 12 * 4096
    assert (plan.window, plan.window_limit, plan.fits, plan.missing_bytes) == (window, "memory", True, 0)
    assert plan.per_gpu[0].total_bytes == hand_gpu(cfg, range(48), window, weights, True) <= H100


def test_maverick_fp8_on_8_h100_matches_the_hand_computation():
    cfg = get_preset("maverick")
    result = plan_cli("--model", "maverick", "--precision", "fp8", "--gpu", "h100-80gb", "--gpus", "8", "--json", "--text-only")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    ranges = [range(*g["layers"]) for g in plan["per_gpu"]]
    assert [r.start for r in ranges] == [0] + [r.stop for r in ranges[:-1]] and ranges[-1].stop == 48
    weights = [hand_weights(cfg, r, "fp8", k == 0, k == 7) for k, r in enumerate(ranges)]
    assert [g["weight_bytes"] for g in plan["per_gpu"]] == weights
    assert plan["weight_bytes"] == sum(weights) == hand_weights(cfg, range(48), "fp8", True, True)
    window = min(hand_window(cfg, r, H100, w, k == 7) for k, (r, w) in enumerate(zip(ranges, weights)))
    assert plan["window"] == window and plan["fits"]
    for k, (r, w, g) in enumerate(zip(ranges, weights, plan["per_gpu"])):
        assert g["total_bytes"] == hand_gpu(cfg, r, window, w, k == 7) <= H100


def test_window_boundary_w_fits_and_w_plus_one_does_not():
    cfg = get_preset("scout")
    weights = hand_weights(cfg, range(48), "int4", True, True)
    memory = hand_gpu(cfg, range(48), 300_000, weights, True, tokens=128)  # exactly W = 300,000 tokens' worth
    plan = plan_memory(cfg, "int4", memory, max_prefill=128)
    assert plan.window == 300_000 and plan.per_gpu[0].free_bytes == 0
    assert plan_memory(cfg, "int4", memory, max_prefill=128, window=300_000).fits
    assert not plan_memory(cfg, "int4", memory, max_prefill=128, window=300_001).fits
    assert plan_memory(cfg, "int4", memory - 1, max_prefill=128).window == 299_999


def test_the_kv_cache_is_planned_in_the_graphs_float_type_and_int4_at_the_exports_block():
    """An fp32 artifact caches K/V in fp32: planned in bf16 by default, its W was 27 % too large; int4's default
    block is export's (scout-tiny's sizes take 32), not always 128."""
    cfg = get_preset("scout")
    fp32 = plan_memory(cfg, "fp32", 500 * GIB)
    assert fp32.kv_dtype == "fp32" and fp32.kv_bytes_per_token["per_layer"] == 2 * 8 * 128 * 4
    assert plan_memory(cfg, "bf16", 500 * GIB).kv_dtype == "bf16"
    tiny = get_preset("scout-tiny")
    assert plan_memory(tiny, "int4", 24 * GIB).weight_bytes == plan_memory(tiny, "int4", 24 * GIB, block_size=32).weight_bytes
    assert plan_memory(tiny, "int4", 24 * GIB).weight_bytes != plan_memory(tiny, "int4", 24 * GIB, block_size=128).weight_bytes
    result = plan_cli("--model", "maverick", "--precision", "int4", "--gpu", "h100-80gb", "--text-only")
    assert result.exit_code == 1 and "lower --precision" not in result.stdout  # int4 is the lowest


def test_whole_context_fits_when_memory_allows():
    plan = plan_memory(get_preset("scout-tiny"), "fp16", 24 * 10**9)
    assert (plan.window, plan.window_limit, plan.fits) == (4096, "context", True)


def test_not_fitting_reports_what_is_missing_and_exits_1():
    cfg = get_preset("maverick")
    weights = hand_weights(cfg, range(48), "int4", True, True)
    plan = plan_memory(cfg, "int4", H100)
    assert not plan.fits and plan.window == 0
    assert plan.missing_bytes == hand_gpu(cfg, range(48), 8192, weights, True) - H100  # at W = one chunk
    result = plan_cli("--model", "maverick", "--precision", "int4", "--gpu", "h100-80gb", "--text-only")
    assert result.exit_code == 1 and "does not fit" in result.stdout and f"{plan.missing_bytes / GIB:,.2f} GiB missing" in result.stdout
    # a requested W that does not fit was called "largest W that fits" too
    asked = plan_cli("--model", "scout", "--gpu", "h100-80gb", "--window", "100")
    line = " ".join(asked.stdout.split())
    assert asked.exit_code == 1 and "missing on the fullest GPU at the requested W = 100 — try" in line, asked.stdout
    assert "largest W that fits" not in line


# ------------------------------------------------------------------------------------------------ vision
def transformers_vision_params(config_json: dict) -> int:
    """Parameters of transformers' vision model + projector for a Llama4ForConditionalGeneration config (meta device)."""
    import torch
    from transformers import Llama4Config
    from transformers.models.llama4.modeling_llama4 import Llama4MultiModalProjector, Llama4VisionModel

    config = Llama4Config(**config_json)
    with torch.device("meta"):
        modules = (Llama4VisionModel(config.vision_config), Llama4MultiModalProjector(config))
    return sum(p.numel() for m in modules for p in m.parameters())


SCOUT_VISION_JSON = {  # Scout's published config.json, the fields that shape the tower (Maverick's are the same)
    "vision_config": {"image_size": 336, "patch_size": 14, "hidden_size": 1408, "intermediate_size": 5632,
                      "num_hidden_layers": 34, "num_attention_heads": 16, "pixel_shuffle_ratio": 0.5,
                      "projector_input_dim": 4096, "projector_output_dim": 4096, "vision_output_dim": 4096},
    "text_config": {"hidden_size": 5120},
}


def hand_encode(tiles: int, act: int = 2) -> tuple[int, int]:
    """(workspace of one Scout-tower encode of `tiles` tiles, the projected features it hands the prefill)."""
    n, per_tile = tiles * (24 * 24 + 1), 24 * 24 + 1
    features = tiles * 144 * 5120 * act
    attention = 3 * n * 1408 * act + 2 * tiles * 16 * per_tile**2 * 4
    return 4 * n * 1408 * act + max(attention, 2 * n * 5632 * act) + features, features


def test_scout_vision_tower_is_planned_on_the_first_gpu():
    cfg, vision = get_preset("scout"), get_vision_preset("scout")
    params = transformers_vision_params(SCOUT_VISION_JSON)
    encode, features = hand_encode(17)
    text = hand_weights(cfg, range(48), "int4", True, True)
    window = hand_window(cfg, range(48), H100, text + 2 * params + features, True)
    plan = plan_memory(cfg, "int4", H100, vision=vision)
    assert plan.vision == {"params": params, "precision": "fp16", "weight_bytes": 2 * params, "max_tiles": 17,
                           "tokens_per_tile": 144, "encode_workspace_bytes": encode}
    assert plan.weight_bytes == text + 2 * params and plan.window == window < plan_memory(cfg, "int4", H100).window
    assert plan.per_gpu[0].total_bytes == hand_gpu(cfg, range(48), window, text + 2 * params + features, True) <= H100
    assert planned_window(cfg, "int4", H100, 2, vision=vision) == window  # the runtime's default W on a GPU
    quantized_tower = plan_memory(cfg, "int4", H100, vision=vision, vision_precision="int4")  # an artifact's int4 tower
    assert planned_window(cfg, "int4", H100, 2, vision=vision, vision_precision="int4") == quantized_tower.window > window
    # a short prefill: the image encode is the largest transient set
    short = plan_memory(cfg, "int4", H100, vision=vision, max_prefill=16, window=8192, max_tiles=5).per_gpu[0]
    assert short.workspace_bytes == hand_encode(5)[0]
    # split over GPUs: the tower sits with the embedding
    assert [g.vision_weight_bytes for g in plan_memory(cfg, "fp8", H100, gpus=2, vision=vision).per_gpu] == [2 * params, 0]


def test_plan_cli_includes_the_vision_tower_of_a_preset_and_of_a_checkpoint():
    scout = json.loads(plan_cli("--model", "scout", "--precision", "int4", "--gpu", "h100-80gb", "--json").stdout)
    assert scout["window"] == plan_memory(get_preset("scout"), "int4", H100, vision=get_vision_preset("scout")).window
    assert json.loads(plan_cli("--model", "scout", "--precision", "int4", "--gpu", "h100-80gb", "--json",
                               "--text-only").stdout)["vision"] is None
    fixture = Path(__file__).parent / "fixtures" / "vision" / "tiny-a"
    result = plan_cli("--checkpoint", str(fixture), "--precision", "fp32", "--gpu-memory", "24GB", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    params = transformers_vision_params(json.loads((fixture / "config.json").read_text()))
    assert plan["vision"]["params"] == params and plan["per_gpu"][0]["vision_weight_bytes"] == 4 * params
    table = plan_cli("--checkpoint", str(fixture), "--gpu-memory", "24GB")
    assert table.exit_code == 0 and "vision tower on GPU 0" in table.stdout


def test_a_checkpoint_is_planned_and_inspected_from_its_config_json_before_its_weights_are_downloaded(tmp_path):
    """A directory holding config.json alone (what one downloads first) plans and inspects as the whole checkpoint
    does; once weights are there (even only their index) every tensor is checked as before."""
    fixture = Path(__file__).parent / "fixtures" / "vision" / "tiny-a"
    alone = tmp_path / "tiny-a"
    alone.mkdir()
    (alone / "config.json").write_bytes((fixture / "config.json").read_bytes())
    for command, args in (("plan", ["--precision", "int4", "--gpu-memory", "24GB"]), ("inspect", [])):
        results = [CliRunner().invoke(export_app, [command, "--checkpoint", str(d), *args, "--json"]) for d in (fixture, alone)]
        assert [r.exit_code for r in results] == [0, 0], results[1].output
        assert json.loads(results[1].stdout) == json.loads(results[0].stdout)
    (alone / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-1.safetensors"}}))
    missing = plan_cli("--checkpoint", str(alone), "--gpu-memory", "24GB")
    assert missing.exit_code == 2 and "model-1.safetensors: shard listed in model.safetensors.index.json is missing" \
        in " ".join(missing.output.split())


STORED_BITS = {onnx.TensorProto.FLOAT: 32, onnx.TensorProto.FLOAT16: 16, onnx.TensorProto.INT4: 4,
               onnx.TensorProto.FLOAT8E4M3FN: 8, onnx.TensorProto.INT64: 64}


def test_a_quantized_vision_tower_is_planned_as_the_tensorrt_export_stores_it(tmp_path):
    """--vision-precision int4 / fp8: the planned tower bytes are the initializer bytes of the vision graph the pipeline
    writes for tensorrt, less its non-parameter constants (RoPE tables, shapes: what its fp16 graph holds beyond
    transformers' parameters in fp16)."""
    fixture = Path(__file__).parent / "fixtures" / "vision" / "tiny-a"
    source = CheckpointWeights(fixture)
    processor = ImageProcessorConfig.from_directory(fixture, source.vision.config)

    def stored(precision: str) -> int:
        out = tmp_path / precision
        (out / "work").mkdir(parents=True)
        write_vision_graph(source.vision, processor, precision, out, out / "work", "tensorrt")
        initializers = onnx.load(out / VISION_FILE, load_external_data=False).graph.initializer
        return sum(math.prod(t.dims) * STORED_BITS[t.data_type] // 8 for t in initializers)

    written = {precision: stored(precision) for precision in ("int4", "fp8", "fp16")}
    constants = written["fp16"] - 2 * transformers_vision_params(json.loads((fixture / "config.json").read_text()))
    for precision, size in written.items():
        plan = plan_memory(source.config, "fp16", 24 * GIB, vision=source.vision.config, vision_precision=precision)
        assert (plan.vision["precision"], plan.vision["weight_bytes"]) == (precision, size - constants)
    inspected = api.inspect_model(checkpoint=fixture)["vision"]  # 16-bit floats, as the tensorrt graphs
    assert [inspected[f"weight_bytes_{p}"] for p in ("int4", "fp8")] == [written[p] - constants for p in ("int4", "fp8")]
    result = plan_cli("--model", "scout", "--gpu", "h100-80gb", "--text-only", "--vision-precision", "int4")
    assert result.exit_code == 2 and "--vision-precision int4: no vision tower is planned" in result.output


# ------------------------------------------------------------------------------------------------ partitions
def brute_force_best(cfg, n: int, precision: str) -> int:
    """The smallest possible largest part over every contiguous split into n parts."""
    best = None
    for cuts in itertools.combinations(range(1, cfg.num_hidden_layers), n - 1):
        bounds = (0, *cuts, cfg.num_hidden_layers)
        largest = max(hand_weights(cfg, range(a, b), precision, k == 0, k == n - 1) for k, (a, b) in enumerate(zip(bounds, bounds[1:])))
        best = largest if best is None else min(best, largest)
    return best


@pytest.mark.parametrize("preset, n, precision", [("maverick", 3, "fp8"), ("scout", 2, "int4"), ("maverick-tiny", 3, "bf16"),
                                                  ("scout-tiny", 4, "fp32")])
def test_partitions_are_contiguous_and_optimally_balanced(preset, n, precision):
    cfg = get_preset(preset)
    parts = partition_layers(cfg, n, precision)
    assert len(parts) == n and all(len(p) > 0 for p in parts)
    assert [p.start for p in parts] == [0] + [p.stop for p in parts[:-1]] and parts[-1].stop == cfg.num_hidden_layers
    largest = max(hand_weights(cfg, p, precision, k == 0, k == n - 1) for k, p in enumerate(parts))
    assert largest == brute_force_best(cfg, n, precision)


def test_partition_count_out_of_range_is_refused():
    with pytest.raises(ConfigError, match="9 partitions for 8 layers: need between 1 and 8"):
        partition_layers(get_preset("scout-tiny"), 9)
    assert partition_layers(get_preset("scout-tiny"), 1) == [range(0, 8)]


# ------------------------------------------------------------------------------------------------ runtime default W
def test_generator_on_a_gpu_sizes_its_window_with_the_planner():
    cfg = get_preset("scout-tiny")
    backend = TorchBackend(from_preset("scout-tiny"))  # fp32 cache and activations, prefill pieces of 512
    assert Generator(backend).window == default_window(cfg, 4)  # CPU: unchanged
    weights = hand_weights(cfg, range(8), "fp32", True, True)
    backend.device_memory_bytes = hand_gpu(cfg, range(8), 1000, weights, True, act=4, kv=4)  # a GPU of exactly that size
    gen = Generator(backend)
    assert gen.window == 1000
    assert gen.generate([1, 2, 3], max_new_tokens=2).token_ids  # the planned cache runs


def test_tensorrt_build_window_comes_from_the_planner_for_the_gpu():
    cfg = get_preset("maverick-tiny")
    manifest = {"model": cfg.to_hf_dict(), "precision": "fp16", "dtypes": {"kv_cache": "float16"},
                "graphs": {"decode": {"new_tokens": 1}, "prefill": {"new_tokens": None, "max_new_tokens": 32}}}
    weights = hand_weights(cfg, range(8), "fp16", True, True)
    memory = hand_gpu(cfg, range(8), 777, weights, True, tokens=32, batch=2)
    assert build_limits(manifest, max_batch=2, gpu_memory_bytes=memory).global_slots == 777
    assert build_limits(manifest, max_batch=2).global_slots == default_window(cfg, 2)  # no GPU: as before
    tower = CheckpointWeights(Path(__file__).parent / "fixtures" / "vision" / "tiny-a").vision.config
    multimodal = {**manifest, "vision": {"config": tower.to_dict(), "precision": "int4"}}
    planned = plan_memory(cfg, "fp16", memory, max_batch=2, max_prefill=32, vision=tower, vision_precision="int4")
    assert build_limits(multimodal, max_batch=2, gpu_memory_bytes=memory).global_slots == planned.window < 777
    for entry in ({"precision": "int4"}, {"config": None, "precision": "int4"}):  # hand-edited: one line, not KeyError
        with pytest.raises(ConfigError, match=r"^manifest.json: the vision entry has no config object; re-run the export$"):
            build_limits({**manifest, "vision": entry}, max_batch=2, gpu_memory_bytes=memory)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("args, message", [
    (["--model", "scout", "--gpu", "h100-81gb"], "--gpu 'h100-81gb' is unknown; choose one of: h100-80gb, h200-141gb"),
    (["--model", "scout", "--gpu-memory", "24XB"], "--gpu-memory '24XB': expected a number with a unit, e.g. 24GB"),
    (["--model", "scout", "--gpu-memory", "24"], "--gpu-memory '24': expected a number with a unit"),
    (["--model", "scout", "--precision", "int3", "--gpu", "h100-80gb"], "precision 'int3' is unknown; choose one of"),
    (["--model", "scout", "--gpu", "h100-80gb", "--gpu-memory", "80GB"], "give exactly one of --gpu NAME or --gpu-memory"),
    (["--model", "scout", "--gpu", "h100-80gb", "--kv-dtype", "int8"], "--kv-dtype 'int8' is unknown"),
    (["--model", "scout", "--gpu", "h100-80gb", "--gpus", "49"], "49 partitions for 48 layers"),
    (["--model", "scout", "--gpu", "h100-80gb", "--max-batch", "0"], "--max-batch 0: must be at least 1"),
    (["--model", "llama5", "--gpu", "h100-80gb"], "unknown preset 'llama5'"),
    # planned as if int4 had them (a "does not fit" with exit 1) or silently ignored; export refuses both
    (["--model", "scout", "--precision", "int4", "--gpu", "h100-80gb", "--block-size", "7"],
     "--block-size 7 is not supported for int4; choose one of: 32, 64, 128"),
    (["--model", "scout", "--precision", "fp8", "--gpu", "h100-80gb", "--block-size", "64"],
     "--block-size 64 applies to int4 weights only"),
    # planned as "fits", where export refuses an FP8 cache without calibrated scales / ignored the tiles
    (["--model", "scout", "--precision", "fp32", "--gpu", "h100-80gb", "--kv-dtype", "fp8"],
     "--kv-dtype fp8: an FP8 KV cache takes calibrated scales"),
    (["--model", "scout", "--gpu", "h100-80gb", "--text-only", "--max-tiles", "5"],
     "--max-tiles 5: no vision tower is planned"),
])
def test_bad_input_prints_one_line_and_exits_2(args, message):
    result = plan_cli(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_gpu_memory_size_and_json_output():
    cfg = get_preset("scout")
    result = plan_cli("--model", "scout", "--precision", "int4", "--gpu-memory", "80GiB", "--kv-dtype", "fp8", "--json", "--text-only")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    weights = hand_weights(cfg, range(48), "int4", True, True)
    assert plan["gpu_memory_bytes"] == 80 * GIB and plan["kv_dtype"] == "fp8" and plan["kv_bytes_per_token"]["total"] == 98_304
    assert plan["window"] == hand_window(cfg, range(48), 80 * GIB, weights, True, kv=1)
    g = plan["per_gpu"][0]
    assert g["total_bytes"] == g["weight_bytes"] + g["kv_chunked_bytes"] + g["kv_global_bytes"] + g["workspace_bytes"] + g["reserve_bytes"]
    table = plan_cli("--model", "scout", "--precision", "int4", "--gpu", "h100-80gb", "--text-only")
    assert table.exit_code == 0 and f"W = {hand_window(cfg, range(48), H100, weights, True):,} tokens" in table.stdout


@pytest.mark.parametrize("options, message", [
    ({"max_batch": "2"}, "plan_gpu_memory(max_batch='2'): expected an integer, not str"),  # were TypeErrors from '<'
    ({"window": "4k"}, "plan_gpu_memory(window='4k'): expected an integer or None, not str"),
    ({"max_batch": 1.5}, "plan_gpu_memory(max_batch=1.5): expected an integer, not float"),  # was planned as 1.5
    ({"text_only": "no"}, "plan_gpu_memory(text_only='no'): expected True or False, not str"),  # was taken as True
    ({"gpu": None, "gpu_memory": 80 * GIB}, "plan_gpu_memory(gpu_memory=85899345920): expected a size such as '80GB'"),
    ({"max_batchs": 2}, "plan_gpu_memory(max_batchs=...): unknown option; choose from: gpus, max_batch"),
])
def test_the_python_api_refuses_a_bad_option_in_one_line(options, message):
    """api.plan_gpu_memory is what `plan` runs; from Python a wrong type was a TypeError / AttributeError from inside."""
    with pytest.raises(ConfigError) as raised:
        api.plan_gpu_memory(**{"model": "scout", "gpu": "h100-80gb", **options})
    assert str(raised.value).startswith(message), str(raised.value)
