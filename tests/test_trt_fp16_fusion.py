"""The MoE fusion on fp16 traces: torch computes the router sigmoid (and the dense form's expert sum) in fp32, so the
fp16 graph holds Cast → Sigmoid → Cast (and Cast → ReduceSum → Cast) where the fp32 graph has the bare op. The fusion
must fire there too — one Llama4MoE per MoE layer, lowered to the TensorRT plugin node or ORT's standard ops — and the
graph must compute what the traced graph computes (ONNX Runtime on both; the plugin node through its numpy reference).

One MoE layer of scout-tiny at fp16 (decode: gather form, prefill: dense form), exported by the real exporter
(~20 s); the logits are the output that passes through the MoE.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from llama4_export.export.onnx_export import DECODE, PREFILL, export_graph
from llama4_export.graph_passes.manager import op_histogram
from llama4_export.graph_passes.pipeline import optimize
from llama4_export.graph_passes.verify import executable_copy, reference_ops_available, sample_feeds
from llama4_export.model import get_preset
from llama4_export.weights import from_config

# × max|output|, the fp16 bound (the fused op rounds to fp16 once, where the trace rounds after every op)
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def fp16_graphs() -> dict[str, ir.Model]:
    import torch

    config = dataclasses.replace(get_preset("scout-tiny"), num_hidden_layers=1, moe_layers=(0,), name="moe-fp16")
    model = from_config(config, seed=0, dtype=torch.float16)
    return {spec.name: export_graph(model, spec) for spec in (DECODE, PREFILL)}


def _run(model: ir.Model, feeds: dict[str, np.ndarray], tmp_path, name: str) -> dict[str, np.ndarray]:
    runnable, library = executable_copy(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if library:
        options.register_custom_ops_library(library)
    path = tmp_path / f"{name}.onnx"
    ir.save(runnable, path, external_data=f"{name}.data")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
@pytest.mark.parametrize("graph", ["decode", "prefill"])
def test_fp16_moe_is_fused_and_keeps_its_outputs(fp16_graphs, graph, target, tmp_path):
    if target == "tensorrt" and not reference_ops_available():
        pytest.skip("onnxruntime-extensions (dev dependency) runs the plugin node's reference on ONNX Runtime")
    traced = fp16_graphs[graph]
    before = op_histogram(traced)
    assert before["Sigmoid"] == 3  # router score (in fp32, between Casts), expert and shared SwiGLU
    feeds = sample_feeds(traced, seed=1)
    reference = _run(traced, feeds, tmp_path, "traced")

    optimized, report = optimize(traced.clone(), target)
    rewrites = {r.name: r.rewrites for r in report.records}
    assert rewrites[f"fuse_moe_{'gather' if graph == 'decode' else 'dense'}"] == 1
    after = op_histogram(optimized)
    if target == "tensorrt":
        assert after["trt.plugins::Llama4MoEPlugin"] == 1
        assert after["Sigmoid"] == after["ArgMax"] == after["GatherND"] == 0  # the whole MoE is in the plugin
    else:  # lowered for ONNX Runtime (today: standard ops, as com.microsoft.MoE is used for fp32 only)
        assert after["ai.llama4export::Llama4MoE"] == 0 and report.moe_lowering
    assert after["Cast"] < before["Cast"]

    outputs = _run(optimized, feeds, tmp_path, "optimized")
    assert outputs.keys() == reference.keys()
    for name, ref in reference.items():
        ref64, out64 = ref.astype(np.float64), outputs[name].astype(np.float64)
        error = np.abs(out64 - ref64).max() / np.abs(ref64).max()
        assert error <= TOLERANCE, f"{graph}/{target}: {name} moved by {error:.2e} × max|{name}|"
