"""--precision bf16: bf16 weights / activations / KV cache, fp32 logits, for TensorRT (ONNX Runtime's CPU EP has no bf16
kernels, so the numbers are checked on the graph widened to fp32 against PyTorch with the same bf16-rounded weights)."""

from __future__ import annotations

import shutil

import numpy as np
import onnx_ir as ir
import onnxruntime
import pytest
import torch

from llama4_export.tensorrt.lint import lint_artifact
from llama4_export import api
from llama4_export.graph_passes.artifact_passes import optimize_artifact
from llama4_export.graph_passes.verify import run_onnxruntime, widened_bfloat16
from llama4_export.model import get_preset
from llama4_export.weights import from_config
from llama4_export.model.modeling import KVCache
from llama4_export.evaluation.torch_backend import onnx_initializers

PRESET, LAYERS = "scout-tiny", 4  # its first 4 layers: 3 chunked, 1 global (NoPE)


@pytest.fixture(scope="module")
def bf16_artifacts(tmp_path_factory):
    """One bf16 export, optimized for tensorrt twice: with the MoE plugin node and with the standard-op fallback."""
    base = tmp_path_factory.mktemp("bf16")
    api.export_model(base / "traced", model=PRESET, layers=LAYERS, random_weights=True, precision="bf16",
                     target="tensorrt", optimize=False, show_progress=False)
    out = {}
    for name, plugin in (("plugin", True), ("fallback", False)):
        shutil.copytree(base / "traced", base / name)
        # the plugin copy by the default target: the one a --no-optimize --target tensorrt export was traced for
        optimize_artifact(base / name, None if plugin else "tensorrt", trt_plugin=plugin, show_progress=False)
        out[name] = base / name
    return out


def test_weights_are_torch_bf16_rounding_and_io_types(bf16_artifacts):
    decode = bf16_artifacts["plugin"] / "decode.onnx"
    weights = onnx_initializers(decode)
    weights.update({name.removesuffix(".T"): w.T for name, w in weights.items() if name.endswith(".T")})  # MatMul layout
    model = from_config(get_preset(PRESET, LAYERS), dtype=torch.float32)
    for name, param in model.named_parameters():
        expected = param.detach().to(torch.bfloat16).view(torch.int16).numpy()
        assert weights[name].dtype.itemsize == 2 and "bfloat16" in str(weights[name].dtype), name
        np.testing.assert_array_equal(weights[name].view(np.int16), expected, err_msg=name)
    graph = ir.load(decode).graph
    types = {v.name: v.dtype for v in [*graph.inputs, *graph.outputs]}
    assert types["logits"] == ir.DataType.FLOAT
    assert types["past_key.0"] == types["new_value.3"] == ir.DataType.BFLOAT16


def test_tensorrt_lint_passes(bf16_artifacts):
    for directory in bf16_artifacts.values():
        violations = lint_artifact(directory)
        assert violations and all(v == [] for v in violations.values()), [x.format() for v in violations.values() for x in v]


def test_decode_logits_match_pytorch_with_bf16_weights(bf16_artifacts):
    """The graph widened to fp32 (bf16 weights are exact in fp32) on ORT vs our PyTorch model whose weights are rounded
    to bf16 and which computes in fp32: checks the graph and its weights, not bf16 activation rounding."""
    model = from_config(get_preset(PRESET, LAYERS), dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    config = model.config
    rng = np.random.default_rng(0)
    prompt = torch.from_numpy(rng.integers(3, config.vocab_size, (1, 6)))
    with torch.no_grad():
        _, past = model(prompt, torch.arange(6)[None], KVCache.empty(config, 1, torch.float32))
        token, position = torch.tensor([[int(rng.integers(3, config.vocab_size))]]), torch.tensor([[6]])
        past_positions = torch.arange(6)[None]
        cache = KVCache(list(past.keys), list(past.values), [past_positions] * config.num_hidden_layers)
        reference, new = model(token, position, cache)
    feeds = {"input_ids": token.numpy(), "positions": position.numpy(),
             "past_positions_chunked": past_positions.numpy(), "past_positions_global": past_positions.numpy()}
    for i in range(config.num_hidden_layers):
        feeds[f"past_key.{i}"], feeds[f"past_value.{i}"] = past.keys[i].numpy(), past.values[i].numpy()
    widened = widened_bfloat16(ir.load(bf16_artifacts["fallback"] / "decode.onnx"))
    out = run_onnxruntime(widened, feeds)
    scale = float(reference.abs().max())
    error = float(np.abs(out["logits"] - reference.numpy()).max())
    print(f"bf16 widened decode vs PyTorch(bf16 weights): max|Δlogit| {error:.3g} = {error / scale:.2e} × max|logit|")
    assert error <= 1e-3 * scale, f"decode logits differ by {error:.3g} (max |logit| {scale:.3g})"
    np.testing.assert_allclose(out["new_key.0"], new.keys[0].numpy(), atol=1e-4 * float(new.keys[0].abs().max()))


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="this onnxruntime runs bf16 (CUDA EP)")
def test_bf16_for_onnxruntime_cpu_is_one_line_exit_2(tmp_path):
    from typer.testing import CliRunner

    from llama4_export.cli.export import export_app

    out = tmp_path / "bf16-ort"
    result = CliRunner().invoke(export_app, ["--model", PRESET, "--precision", "bf16", "--target", "onnxruntime", "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "bf16" in lines[0] and "--target tensorrt" in lines[0] and "fp16" in lines[0], result.output
    assert not out.exists()


def test_fp8_kv_cache_pass_on_a_tensorrt_graph_lints_clean(bf16_artifacts):
    """The FP8 KV-cache Q/DQ (graph_passes/quantize.py) on a tensorrt-lowered graph: float8 cache I/O, scales in the
    graph's float type (bf16 here), no lint violation."""
    from llama4_export.tensorrt.lint import lint_model
    from llama4_export.graph_passes.manager import PassContext
    from llama4_export.graph_passes.quantize import QuantSpec, quantize_kv_cache

    model = ir.load(bf16_artifacts["plugin"] / "decode.onnx")
    layers = sum(v.name.startswith("past_key.") for v in model.graph.inputs)
    spec = QuantSpec("fp8", kv_cache_amax={i: (4.0, 1.0) for i in range(layers)})
    assert quantize_kv_cache(model, PassContext("tensorrt", "gather", quantization=spec)) == 2 * layers
    assert model.graph.initializers["kv_cache.0.key_scale"].dtype == ir.DataType.BFLOAT16
    assert all(v.dtype == ir.DataType.FLOAT8E4M3FN for v in [*model.graph.inputs, *model.graph.outputs]
               if v.name.startswith(("past_", "new_")) and not v.name.startswith("past_positions"))
    assert lint_model(model) == []
