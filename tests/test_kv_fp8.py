"""--kv-cache-dtype fp8: calibrated per-layer K/V scales, Q/DQ at the cache boundary, float8 buffers bound to ONNX Runtime."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
import torch

from llama4_export.artifact import read_manifest
from llama4_export import api
from llama4_export.pipeline import QuantOptions
from llama4_export.evaluation.compare import compare_artifact
from llama4_export.graph_passes.verify import run_onnxruntime
from llama4_export.model import get_preset
from llama4_export.weights import RandomWeights, from_config
from llama4_export.model.modeling import KVCache
from llama4_export.runtime.ort_backend import OrtBackend
from llama4_export.runtime.generator import Generator
from llama4_export.runtime.kv_cache import SlidingKVCache

PRESET, LAYERS = "scout-tiny", 4  # its first 4 layers: 3 chunked, 1 global (NoPE)
FP8 = ir.DataType.FLOAT8E4M3FN


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    base = tmp_path_factory.mktemp("kvfp8")
    options = QuantOptions(report=False, kv_cache_dtype="fp8", calib_cache=base / "calib.safetensors")
    api.export_model(base / "fp8-kv", model=PRESET, layers=LAYERS, random_weights=True, precision="fp8", quant=options,
                     target="onnxruntime", show_progress=False)
    return base / "fp8-kv"


def without_fp8_cache(model: ir.Model) -> ir.Model:
    """The graph the fp8 export makes without --kv-cache-dtype fp8: the KV pass only adds a DequantizeLinear after each
    float8 cache input and a QuantizeLinear before each float8 cache output; take them out."""
    graph = model.graph
    for value in graph.inputs:
        if value.dtype == FP8:
            (dequantize,) = [use.node for use in value.uses()]
            assert dequantize.op_type == "DequantizeLinear"
            dequantize.outputs[0].replace_all_uses_with(value)
            value.type = ir.TensorType(ir.DataType.FLOAT)
            graph.remove(dequantize, safe=True)
    for index, value in enumerate(list(graph.outputs)):
        if value.dtype == FP8:
            quantize = value.producer()
            assert quantize.op_type == "QuantizeLinear"
            unquantized, name = quantize.inputs[0], value.name
            graph.outputs[index] = unquantized
            value.name, unquantized.name = f"{name}.fp8", name
            graph.remove(quantize, safe=True)
    return model


def scales(model: ir.Model) -> dict[str, float]:
    return {name: float(v.const_value.numpy()) for name, v in model.graph.initializers.items() if name.startswith("kv_cache.")}


def test_manifest_and_cache_io_are_float8(artifact):
    manifest = read_manifest(artifact)
    assert manifest["dtypes"]["kv_cache"] == "float8_e4m3fn"
    assert manifest["quantization"]["kv_cache"]["dtype"] == "float8e4m3fn"
    for graph_file in ("decode.onnx", "prefill.onnx"):
        graph = ir.load(artifact / graph_file).graph
        cache_io = [v for v in [*graph.inputs, *graph.outputs] if v.name.split(".")[0] in ("past_key", "past_value", "new_key", "new_value")]
        assert len(cache_io) == 4 * LAYERS and all(v.dtype == FP8 for v in cache_io), graph_file
        assert next(v for v in graph.outputs if v.name == "logits").dtype == ir.DataType.FLOAT


def test_scales_are_calibrated_kv_amax_over_448(artifact):
    """Independent of the calibration hooks: the K/V our PyTorch model returns on the same calibration samples."""
    from llama4_export.calib.calibrate import calibration_samples, tokenizer_for

    source = RandomWeights(PRESET, layers=LAYERS)
    model = from_config(get_preset(PRESET, LAYERS))
    config = model.config
    samples, _ = calibration_samples(source, config, tokenizer_for(source, config), None, None, None)
    amax = np.zeros((config.num_hidden_layers, 2))
    with torch.no_grad():
        for row in samples:
            ids = torch.from_numpy(row[None])
            _, new = model(ids, torch.arange(ids.shape[1])[None], KVCache.empty(config, 1, torch.float32))
            for i in range(config.num_hidden_layers):
                amax[i] = np.maximum(amax[i], [float(new.keys[i].abs().max()), float(new.values[i].abs().max())])
    got = scales(ir.load(artifact / "decode.onnx"))
    for i in range(config.num_hidden_layers):
        np.testing.assert_allclose([got[f"kv_cache.{i}.key_scale"], got[f"kv_cache.{i}.value_scale"]], amax[i] / 448, rtol=1e-6)
    # A rebuild reads them back from the calibration cache file.
    from safetensors.numpy import load_file

    from llama4_export.calib.stats import kv_cache_amax

    cached = kv_cache_amax(load_file(str(artifact.parent / "calib.safetensors")), config.num_hidden_layers)
    np.testing.assert_allclose([cached[i] for i in range(config.num_hidden_layers)], amax, rtol=1e-6)


def test_qdq_placement_matches_numpy_and_fp8_cache_stays_close(artifact):
    """Decode with a 12-token past: (1) the fp8-KV graph fed float8 caches == the graph without the cache Q/DQ fed the
    numpy dequantization q·s, and its new K/V == numpy's saturating E4M3 quantization of that graph's new K/V, on every
    layer; (2) vs the same graph fed the unquantized fp32 caches (the fp8 artifact without fp8 KV) logits stay close."""
    fp8_kv = ir.load(artifact / "decode.onnx")
    reference = without_fp8_cache(ir.load(artifact / "decode.onnx"))
    scale_of = scales(fp8_kv)
    model = from_config(get_preset(PRESET, LAYERS))
    config = model.config
    past_tokens = 12
    prompt = torch.from_numpy(np.random.default_rng(0).integers(3, config.vocab_size, (1, past_tokens)))
    with torch.no_grad():
        _, past = model(prompt, torch.arange(past_tokens)[None], KVCache.empty(config, 1, torch.float32))
    common = {"input_ids": np.array([[7]]), "positions": np.array([[past_tokens]]),
              "past_positions_chunked": np.arange(past_tokens)[None], "past_positions_global": np.arange(past_tokens)[None]}
    fp32_feeds, fp8_feeds, dequantized_feeds = dict(common), dict(common), dict(common)
    for i in range(config.num_hidden_layers):
        for kind, tensor in (("key", past.keys[i]), ("value", past.values[i])):
            x = np.ascontiguousarray(tensor.numpy())
            s = np.float32(scale_of[f"kv_cache.{i}.{kind}_scale"])
            q = np.clip(x / s, -448, 448).astype(ml_dtypes.float8_e4m3fn)
            fp32_feeds[f"past_{kind}.{i}"], fp8_feeds[f"past_{kind}.{i}"] = x, q
            dequantized_feeds[f"past_{kind}.{i}"] = q.astype(np.float32) * s
    got = run_onnxruntime(fp8_kv, fp8_feeds)  # float8 arrays in and out
    numpy_dequantized = run_onnxruntime(reference, dequantized_feeds)
    np.testing.assert_allclose(got["logits"], numpy_dequantized["logits"], rtol=0, atol=1e-6 * np.abs(got["logits"]).max())
    for i in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            s = np.float32(scale_of[f"kv_cache.{i}.{kind}_scale"])
            expected = np.clip(numpy_dequantized[f"new_{kind}.{i}"] / s, -448, 448).astype(ml_dtypes.float8_e4m3fn)
            np.testing.assert_array_equal(got[f"new_{kind}.{i}"].view(np.uint8), expected.view(np.uint8), err_msg=f"new_{kind}.{i}")
    unquantized = run_onnxruntime(reference, fp32_feeds)["logits"]
    relative = float(np.abs(got["logits"] - unquantized).max() / np.abs(unquantized).max())
    print(f"fp8 KV vs fp32 KV decode logits: max|Δ| = {relative:.3g} × max|logit|")
    assert relative < 0.08


def test_compare_runs_the_float8_cache_graphs(artifact):
    """`llama4-export compare` feeds float8 caches (quantized graphs: run on ONNX Runtime, no float reference)."""
    comparisons, notes = compare_artifact(artifact)
    assert [(c.graph, c.reference) for c in comparisons] == [("decode", "none"), ("prefill", "none")]


def test_compare_refuses_a_checkpoint_it_cannot_use_for_quantized_graphs(artifact, tmp_path):
    """`compare INT4 --checkpoint CKPT` printed "no reference to compare with" and exited 0: the checkpoint was
    accepted, nothing compared. Quantized graphs have no PyTorch reference: the checkpoint is refused, and a plain
    compare says the graphs only ran."""
    from typer.testing import CliRunner

    from llama4_export.cli.export import export_app
    from llama4_export.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--checkpoint: .*'s graphs are fp8, they compute with quantized "
                                          r"weights: without TensorRT engines compare only runs them"):
        compare_artifact(artifact, checkpoint=tmp_path)
    shown = CliRunner().invoke(export_app, ["compare", str(artifact)], terminal_width=200)
    assert shown.exit_code == 0 and "decode: ran on ONNX Runtime, not compared (quantized: no reference)" in shown.output


def test_generates_on_onnxruntime_with_a_quarter_of_the_cache_memory(artifact):
    generator = Generator.load(artifact, backend="onnxruntime", threads=1)
    assert isinstance(generator.backend, OrtBackend) and generator.backend.cache_dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    result = generator.generate([5, 17, 99, 200, 33, 8, 41], max_new_tokens=6)
    assert len(result.token_ids) == 6 and all(0 <= t < generator.config.vocab_size for t in result.token_ids)
    # The prefill wrote the prompt's K/V into the float8 buffers: nonzero bytes where positions are held.
    cache = generator._cache
    assert cache.keys[0].dtype == np.dtype(ml_dtypes.float8_e4m3fn) and np.any(cache.keys[0].view(np.uint8) != 0)
    fp8 = SlidingKVCache(generator.config, window=256, dtype=ml_dtypes.float8_e4m3fn)
    fp32 = SlidingKVCache(generator.config, window=256, dtype=np.float32)
    kv_bytes = [sum(a.nbytes for a in c.keys + c.values) for c in (fp8, fp32)]
    assert kv_bytes[0] * 4 == kv_bytes[1]


@pytest.mark.parametrize("args, expected", [
    (["--precision", "fp16", "--kv-cache-dtype", "fp8"], "--kv-cache-dtype applies to --precision fp8 / int4"),
    (["--precision", "fp8", "--kv-cache-dtype", "int8"], "--kv-cache-dtype 'int8' is unknown; choose fp8"),
])
def test_bad_kv_cache_options_are_one_line_exit_2(tmp_path, args, expected):
    from typer.testing import CliRunner

    from llama4_export.cli.export import export_app

    out = tmp_path / "never"
    result = CliRunner().invoke(export_app, ["--model", PRESET, *args, "--out", str(out)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and expected in result.output, result.output
    assert not out.exists()
