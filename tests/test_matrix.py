"""Every documented combination of the one pipeline, on scout-tiny's first 4 layers (chunked and NoPE attention, MoE
everywhere): --target × --precision × in memory / streamed. Each cell exports through the CLI both ways and the two
artifacts must be byte-identical (graphs and weights); onnxruntime artifacts then generate, tensorrt ones are lint
clean; every export carries its accuracy report (TensorRT-lowered graphs are run with the plugin op served by its
numpy reference). bf16 on the CPU target is refused with one line on purpose (ONNX Runtime's CPU EP has no bf16
kernels). Traces are shared within the process (export/onnx_export.py), so a cell costs its passes and report only."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from llama4_export.cli.export import export_app
from llama4_export.runtime import Generator
from llama4_export.tensorrt.lint import lint_artifact

SOURCE = ["--model", "scout-tiny", "--random-weights", "--layers", "4", "--calib-samples", "2", "--calib-seq-len", "32"]
CELLS = [("onnxruntime", p) for p in ("fp32", "fp16", "fp8", "int4")] + \
        [("tensorrt", p) for p in ("fp32", "fp16", "bf16", "fp8", "int4")]


def _export(out: Path, target: str, precision: str, *extra: str):
    result = CliRunner().invoke(export_app, [*SOURCE, "--target", target, "--precision", precision, *extra,
                                             "--calib-cache", str(out.parent / f"calib-{precision}.safetensors"),
                                             "--out", str(out)])
    return result


@pytest.mark.parametrize("target, precision", CELLS)
def test_export_in_memory_and_streamed_then_run_or_lint(tmp_path, target, precision):
    memory, streamed = tmp_path / "memory", tmp_path / "streamed"
    for out, extra in ((memory, ()), (streamed, ("--stream",))):
        result = _export(out, target, precision, *extra)
        assert result.exit_code == 0, result.output
    files = json.loads((memory / "manifest.json").read_text())["files"]
    assert {"decode.onnx", "prefill.onnx", "model.data", "report.json"} <= set(files)
    different = [n for n in files if n not in ("manifest.json", "report.json")
                 and not filecmp.cmp(memory / n, streamed / n, shallow=False)]
    assert different == []
    report = json.loads((memory / "report.json").read_text())
    assert report["top1_agreement"] > (0.99 if precision in ("fp32", "fp16", "bf16") else 0.5), report
    if target == "onnxruntime":
        result = Generator.load(memory).generate([256, 72, 105], max_new_tokens=6, stop_tokens=[])
        assert len(result.token_ids) == 6
        if precision != "fp16":  # the CPU EP has no fp16 MatMul: ORT keeps fp32 casts of fp16 weights (a GPU format)
            assert_weights_load_without_private_copies(memory, tmp_path / "ort-optimized")
        assert_prefill_projects_only_the_asked_positions(memory / "prefill.onnx")
    else:
        assert {file: [v.format() for v in found] for file, found in lint_artifact(memory).items() if found} == {}


def assert_weights_load_without_private_copies(artifact: Path, scratch: Path):
    """The graph ONNX Runtime optimizes at session start (what the runtime's ORT_ENABLE_ALL session runs) holds no
    weight-sized initializer the artifact lacks: no Transpose or Cast was folded into a private copy of a weight, so
    MatMul reads the memory-mapped bytes of model.data as stored."""
    scratch.mkdir()
    for graph in ("decode.onnx", "prefill.onnx"):
        stored = {t.name for t in onnx.load(artifact / graph, load_external_data=False).graph.initializer}
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(scratch / graph)
        options.log_severity_level = 3  # the warning that a saved optimized graph is machine-specific
        ort.InferenceSession(str(artifact / graph), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(scratch / graph, load_external_data=False)  # weights still point into model.data
        copies = [(t.name, list(t.dims)) for t in optimized.graph.initializer
                  if t.name not in stored and int(np.prod(t.dims)) >= 4096]
        assert copies == [], f"{graph}: ONNX Runtime made private copies {copies}"


def assert_prefill_projects_only_the_asked_positions(prefill: Path):
    """The lm_head projection of the prefill graph reads hidden states selected by the logits_index input: a graph
    that projected every prompt position and picked the logits afterwards would fail this."""
    graph = onnx.load(prefill, load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}

    def ancestors(name: str, seen: set[str]) -> set[str]:
        stack = [name]
        while stack:
            node = producer.get(stack.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                stack.extend(node.input)
        return {i for n in graph.node if n.name in seen for i in n.input}

    logits_node = producer["logits"]
    while logits_node.op_type not in ("MatMul", "MatMulNBits", "Gemm"):  # a Cast or Reshape may follow lm_head
        logits_node = producer[logits_node.input[0]]
    assert "logits_index" in ancestors(logits_node.input[0], set()), logits_node


def test_bf16_on_the_cpu_target_is_refused_with_one_line(tmp_path):
    result = _export(tmp_path / "o", "onnxruntime", "bf16")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "--precision bf16 does not run on ONNX Runtime's CPU EP" in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()
