"""TensorRT-lowered artifacts end to end without TensorRT: lint, ORT-with-plugin-reference vs PyTorch, rebuild, CLI.

Exports (module-scoped; each ~25-50 s): scout-tiny at fp16 for --target tensorrt, and maverick-tiny at fp32 left
unoptimized; the rebuild test re-exports scout-tiny once more. Everything else is graph passes on copies (seconds):
the unoptimized fp32 exports (maverick-tiny, and the shared l4-scoutlike one — the Scout architecture) are lowered
for tensorrt at fp32 (the MoE becomes the plugin node), int4 (RTN, block 32) and fp8 (W8A8 with fixed activation
amax: the lint checks the graph's form, not the scales' values) through the quantization passes.
"""

from __future__ import annotations

import shutil

import onnx
import pytest
from typer.testing import CliRunner

from llama4_export.artifact import read_manifest, write_manifest
from llama4_export.build import BuildError, build_engines, lint_artifact, lint_model, maybe_build_engines, tensorrt_problem
from llama4_export.build.compare import compare_artifact
from llama4_export.build.rebuild import rebuild
from llama4_export.cli import export_app
from llama4_export.export import ModelSource, export_artifact
from llama4_export.graph_passes import optimize_artifact, trt_plugin_spec

TRT_MISSING = tensorrt_problem()


def _tensorrt_export(tmp_path_factory, preset: str, precision: str):
    out = tmp_path_factory.mktemp("trt") / f"{preset}-{precision}"
    export_artifact(out, ModelSource(preset=preset), precision=precision, show_progress=False)
    optimize_artifact(out, "tensorrt", show_progress=False)
    return out


@pytest.fixture(scope="module")
def scout_fp16(tmp_path_factory):
    return _tensorrt_export(tmp_path_factory, "scout-tiny", "fp16")


@pytest.fixture(scope="module")
def maverick_raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "maverick-tiny-raw"
    export_artifact(out, ModelSource(preset="maverick-tiny"), show_progress=False)
    return out


def _lowered(tmp_path_factory, raw, precision: str):
    """A copy of an unoptimized fp32 export, lowered for tensorrt (and quantized when precision is int4/fp8)."""
    from llama4_export.graph_passes.quantize import QuantSpec

    out = tmp_path_factory.mktemp("trt") / f"{raw.name}-{precision}"
    shutil.copytree(raw, out)
    spec = None
    if precision == "int4":
        spec = QuantSpec("int4", block_size=32)
    elif precision == "fp8":
        names = {i.name for i in onnx.load(str(out / "decode.onnx"), load_external_data=False).graph.initializer}
        spec = QuantSpec("fp8", activation_amax={name: 4.0 for name in names})
    optimize_artifact(out, "tensorrt", show_progress=False, quantization=spec)
    return out


@pytest.fixture(scope="module")
def scoutlike_trt(tmp_path_factory, scoutlike_artifact):
    return _lowered(tmp_path_factory, scoutlike_artifact, "fp32")


@pytest.fixture(scope="module")
def maverick_trt(tmp_path_factory, maverick_raw):
    return _lowered(tmp_path_factory, maverick_raw, "fp32")


@pytest.fixture(scope="module", params=["int4", "fp8"])
def quantized_trt(request, tmp_path_factory, scoutlike_artifact, maverick_raw):
    """(scoutlike and maverick-tiny lowered at the given precision)"""
    return [_lowered(tmp_path_factory, raw, request.param) for raw in (scoutlike_artifact, maverick_raw)]


def _plugin_nodes(path):
    return [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == trt_plugin_spec.PLUGIN_NAME]


@pytest.mark.parametrize("name", ["scout_fp16", "scoutlike_trt", "maverick_trt"])
def test_lint_passes_on_tensorrt_lowered_artifacts(request, name):
    results = lint_artifact(request.getfixturevalue(name))
    assert set(results) == {"decode.onnx", "prefill.onnx"}
    assert {f: [v.format() for v in found] for f, found in results.items()} == {"decode.onnx": [], "prefill.onnx": []}


def test_lint_passes_on_quantized_tensorrt_artifacts(quantized_trt):
    for artifact in quantized_trt:
        results = lint_artifact(artifact)
        assert {f: [v.format() for v in found] for f, found in results.items()} == {"decode.onnx": [], "prefill.onnx": []}
        model = onnx.load(str(artifact / "decode.onnx"), load_external_data=False)
        dequantized = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert dequantized, f"{artifact.name}: the quantization passes inserted nothing to lint"
        assert _plugin_nodes(artifact / "decode.onnx")  # the experts still run in the plugin, fed by DequantizeLinear


def test_lint_catches_a_dynamic_int4_scale_in_a_real_graph(tmp_path_factory, maverick_raw):
    artifact = _lowered(tmp_path_factory, maverick_raw, "int4")
    model = onnx.load(str(artifact / "decode.onnx"), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and "block_size" in
                {a.name for a in n.attribute})
    scale = node.input[1]
    model.graph.node.insert(0, onnx.helper.make_node("Identity", [scale], [f"{scale}.runtime"], name="runtime_scale"))
    node.input[1] = f"{scale}.runtime"
    found = [v.format() for v in lint_model(model)]
    assert found == [f"[int4] node '{node.name}' (DequantizeLinear): input 1 '{scale}.runtime' (computed by Identity node "
                     "'runtime_scale') must be a build-time constant (an initializer) for TensorRT"]


def test_fp32_tensorrt_graphs_carry_the_registered_plugin(scoutlike_trt):
    config = read_manifest(scoutlike_trt)["model"]
    moe_layers = config.get("moe_layers") or list(range(config["num_hidden_layers"]))
    for graph in ("decode.onnx", "prefill.onnx"):
        nodes = _plugin_nodes(scoutlike_trt / graph)
        assert len(nodes) == len(moe_layers)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
        assert attrs["plugin_namespace"].decode() == trt_plugin_spec.PLUGIN_NAMESPACE
        assert attrs["num_experts"] == config["num_local_experts"]


def test_ort_with_plugin_reference_matches_pytorch_fp32(scoutlike_trt):
    comparisons, notes = compare_artifact(scoutlike_trt)
    assert any("ORT-only" in n for n in notes)
    for c in comparisons:
        assert c.reference == "pytorch"
        assert c.deviations["logits"] <= 1e-4, (c.graph, c.worst)
        assert c.worst[1] <= 1e-4, (c.graph, c.worst)


def test_ort_matches_pytorch_fp16(scout_fp16):
    comparisons, _ = compare_artifact(scout_fp16)
    by_graph = {c.graph: c for c in comparisons}
    assert by_graph["decode"].deviations["logits"] <= 1e-3
    assert by_graph["prefill"].deviations["logits"] <= 1e-3


def test_ort_with_plugin_reference_matches_pytorch_maverick(maverick_trt):
    assert _plugin_nodes(maverick_trt / "decode.onnx")
    for c in compare_artifact(maverick_trt)[0]:
        assert c.reference == "pytorch" and c.worst[1] <= 1e-4, (c.graph, c.worst)


def test_hand_broken_plugin_attribute_fails_lint_and_cli(tmp_path, scoutlike_trt):
    broken = tmp_path / "broken"
    shutil.copytree(scoutlike_trt, broken)
    model = onnx.load(str(broken / "decode.onnx"), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == trt_plugin_spec.PLUGIN_NAME)
    kept = [a for a in node.attribute if a.name != "activation"]
    del node.attribute[:]
    node.attribute.extend(kept)
    onnx.save(model, str(broken / "decode.onnx"))
    write_manifest(broken, {k: v for k, v in read_manifest(broken, verify=False).items() if k != "files"})
    found = lint_artifact(broken)["decode.onnx"]
    assert len(found) == 1 and found[0].rule == "plugin"
    assert found[0].message == (f"attribute 'activation' is missing; the registered plugin {trt_plugin_spec.PLUGIN_NAMESPACE}"
                                f"::{trt_plugin_spec.PLUGIN_NAME} requires str activation")
    result = CliRunner().invoke(export_app, ["lint", str(broken)])
    assert result.exit_code == 1
    assert f"[plugin] node '{node.name}' ({trt_plugin_spec.PLUGIN_NAME}): attribute 'activation' is missing" in result.output
    with pytest.raises(BuildError, match="1 TensorRT conformance violation"):
        build_engines(broken)  # the lint stops a build before TensorRT is even looked for


def test_cli_lint_and_compare_on_a_clean_artifact(scout_fp16):
    result = CliRunner().invoke(export_app, ["lint", str(scout_fp16)])
    assert result.exit_code == 0, result.output
    assert "no violations against TensorRT 10.15" in result.output
    result = CliRunner().invoke(export_app, ["compare", str(scout_fp16), "--tolerance", "1e-3"])
    assert result.exit_code == 0, result.output
    assert "ORT-only comparison" in result.output and "decode: onnxruntime vs pytorch" in result.output


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT and a GPU are here: the no-TensorRT path does not apply")
def test_without_tensorrt_the_artifact_is_complete_and_the_message_says_what_to_install(scout_fp16):
    line = maybe_build_engines(scout_fp16, require_engine=False)
    assert line.startswith(f"wrote the TensorRT-ready ONNX artifact {scout_fp16}; {TRT_MISSING}")
    assert "pip install --extra-index-url https://pypi.nvidia.com" in line and "tensorrt-cu12" in line
    assert f"llama4-export build {scout_fp16}" in line
    read_manifest(scout_fp16)  # untouched and complete
    with pytest.raises(BuildError, match=f"--require-engine: {TRT_MISSING}"):
        maybe_build_engines(scout_fp16, require_engine=True)
    result = CliRunner().invoke(export_app, ["build", str(scout_fp16)])
    assert result.exit_code == 2 and "tensorrt-cu12" in result.output


def test_rebuild_reproduces_every_file(scout_fp16):
    result = rebuild(scout_fp16, show_progress=False)
    assert result.identical, result.differences
    assert set(result.compared) == set(read_manifest(scout_fp16)["files"])
    assert "decode.onnx" in result.compared and "model.data" in result.compared


def test_rebuild_reports_the_first_difference(scout_fp16):
    """Hashes that differ, or files only one side has: one line each, by file name."""
    from llama4_export.build.rebuild import compare_hashes

    original = read_manifest(scout_fp16)["files"]
    changed = {**original, "prefill.onnx": "0" * 64}
    changed.pop("tokenizer.json")
    assert compare_hashes(changed, original) == [
        f"prefill.onnx: sha256 {'0' * 16}… in the original, {original['prefill.onnx'][:16]}… rebuilt",
        "tokenizer.json: produced by the rebuild, not in the original artifact",
    ]


@pytest.mark.skipif(TRT_MISSING is not None, reason=f"needs TensorRT and a GPU: {TRT_MISSING}")
def test_engines_build_run_and_match_onnxruntime(tmp_path, scout_fp16):
    from llama4_export.runtime import Generator

    out = tmp_path / "engines"
    shutil.copytree(scout_fp16, out)
    manifest = build_engines(out, max_batch=2, max_prefill=16, window=40, show_progress=False)
    assert set(manifest["tensorrt"]["engines"]) == {"decode", "prefill"}
    for name, sha in manifest["tensorrt"]["outputs_sha256"].items():
        assert manifest["files"][name] == sha
    comparisons, notes = compare_artifact(out)
    assert not notes and all(c.reference == "tensorrt" and c.worst[1] <= 1e-2 for c in comparisons)
    trt_ids = Generator.load(out, backend="tensorrt").generate([1, 2, 3], max_new_tokens=8).token_ids
    ort_ids = Generator.load(out, window=40).generate([1, 2, 3], max_new_tokens=8).token_ids
    assert trt_ids == ort_ids
    again = build_engines(out, max_batch=2, max_prefill=16, window=40, reproducible=True, show_progress=False)
    assert again["tensorrt"]["outputs_sha256"] == manifest["tensorrt"]["outputs_sha256"]
