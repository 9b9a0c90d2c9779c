"""TensorRT-lowered artifacts end to end without TensorRT: the export CLI, lint, ORT-with-plugin-reference vs PyTorch,
rebuild.

Six exports through the real CLI (session-scoped, made on first use; each preset's trace is shared by its three):
the first 4 layers of scout-tiny and maverick-tiny (chunked and NoPE attention; Maverick's dense and MoE layers) at
fp16, int4 and fp8 with `--target tensorrt` (int4/fp8 calibrate on 4 × 32 tokens and skip the accuracy report). Every
one must pass the lint with 0 violations, carry one plugin node per MoE layer in both graphs and end with the line
saying what to install. The unoptimized l4-scoutlike export shared by the suite (the Scout architecture, trained
weights) is exported for tensorrt at fp32, int4 and fp8; the rebuild test re-exports scout-tiny fp16 once more.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from llama4_export.artifact import read_manifest, write_manifest
from llama4_export.tensorrt.engine import build_engines, maybe_build_engines, tensorrt_problem
from llama4_export.tensorrt.errors import BuildError
from llama4_export.tensorrt.lint import lint_artifact, lint_model
from llama4_export.evaluation.compare import compare_artifact, deviations, graph_feeds, run_ort
from llama4_export import api
from llama4_export.pipeline import QuantOptions
from llama4_export.rebuild import rebuild
from llama4_export.cli.export import export_app
from llama4_export.cli.run import run_app
from llama4_export.graph_passes import trt_plugin_spec
from llama4_export.model import get_preset, io_spec
from llama4_export.model.config import Llama4Config

from .conftest import VISION_FIXTURES

TRT_MISSING = tensorrt_problem()
PRESETS = ["scout-tiny", "maverick-tiny"]
PRECISIONS = ["fp16", "int4", "fp8"]
LAYERS = 4
SOURCE = ["--layers", str(LAYERS), "--random-weights"]  # after --model PRESET
SMALL_CALIBRATION = ["--calib-samples", "4", "--calib-seq-len", "32", "--no-report"]
# What the no-TensorRT line must name: NVIDIA's pip index and the exact packages.
INSTALL = 'pip install --extra-index-url https://pypi.nvidia.com "tensorrt-cu12>=10.15" "polygraphy>=0.49"'


@pytest.fixture(scope="session")
def trt_export(tmp_path_factory):
    """(preset, precision) → (artifact dir, CLI output) of `llama4-export --target tensorrt`, each made once."""
    root = tmp_path_factory.mktemp("trt-cli")
    made = {}

    def export(preset: str, precision: str):
        if (preset, precision) not in made:
            out = root / f"{preset}-{precision}"
            args = ["--model", preset, *SOURCE, "--precision", precision, "--target", "tensorrt", "--out", str(out)]
            result = CliRunner().invoke(export_app, args + (SMALL_CALIBRATION if precision != "fp16" else []))
            assert result.exit_code == 0, result.output
            made[preset, precision] = out, result.output
        return made[preset, precision]

    return export


@pytest.fixture(scope="session")
def scout_fp16(trt_export):
    return trt_export("scout-tiny", "fp16")[0]


@pytest.fixture(scope="session")
def maverick_fp16(trt_export):
    return trt_export("maverick-tiny", "fp16")[0]


def _lowered(tmp_path_factory, checkpoint, precision: str):
    """l4-scoutlike exported for tensorrt (int4: RTN, block 32; fp8: calibrated on a few samples), no report."""
    out = tmp_path_factory.mktemp("trt") / f"scoutlike-{precision}"
    quant = QuantOptions(int4_algo="rtn", block_size=32) if precision == "int4" else QuantOptions()
    quant = QuantOptions(**{**quant.__dict__, "report": False, "calib_samples": 2, "calib_seq_len": 32})
    api.export_model(out, checkpoint=checkpoint, precision=precision, target="tensorrt", quant=quant, show_progress=False)
    return out


@pytest.fixture(scope="module")
def scoutlike_trt(tmp_path_factory, scoutlike_dir):
    return _lowered(tmp_path_factory, scoutlike_dir, "fp32")


@pytest.fixture(scope="module", params=["int4", "fp8"])
def scoutlike_quantized_trt(request, tmp_path_factory, scoutlike_dir):
    return _lowered(tmp_path_factory, scoutlike_dir, request.param)


def _plugin_nodes(path):
    return [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == trt_plugin_spec.PLUGIN_NAME]


def _no_violations(artifact) -> None:
    results = lint_artifact(artifact)
    assert {f: [v.format() for v in found] for f, found in results.items()} == {"decode.onnx": [], "prefill.onnx": []}


def _initializer_types(path) -> set[int]:
    return {i.data_type for i in onnx.load(str(path), load_external_data=False).graph.initializer}


def _io_types(path) -> dict[str, int]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}


def _fp32_elements(path) -> int:
    """Elements of fp32 initializers (an fp16 trace keeps RoPE frequencies and a few scalars fp32)."""
    initializers = onnx.load(str(path), load_external_data=False).graph.initializer
    return sum(math.prod(i.dims) for i in initializers if i.data_type == onnx.TensorProto.FLOAT)


# ------------------------------------------------------------------------- `llama4-export --target tensorrt`, 6 ways
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("preset", PRESETS)
def test_cli_tensorrt_export_passes_the_lint_and_says_what_to_install(trt_export, preset, precision):
    out, output = trt_export(preset, precision)
    manifest = read_manifest(out)
    assert (manifest["precision"], manifest["target"]) == (precision, "tensorrt")
    _no_violations(out)
    moe_layers = get_preset(preset, LAYERS).moe_layers
    for graph in ("decode.onnx", "prefill.onnx"):
        assert len(_plugin_nodes(out / graph)) == len(moe_layers), graph  # the MoE runs in the plugin, fp16 included
    quantized = {"fp16": onnx.TensorProto.FLOAT16, "int4": onnx.TensorProto.INT4,
                 "fp8": onnx.TensorProto.FLOAT8E4M3FN}[precision]
    assert quantized in _initializer_types(out / "decode.onnx")
    if precision != "fp16":  # strongly typed: the graph's types are the engine's; int4 / fp8 compute in fp16 as fp16 does
        fp16 = trt_export(preset, "fp16")[0]
        for graph in ("decode.onnx", "prefill.onnx"):
            assert _io_types(out / graph) == _io_types(fp16 / graph), graph  # fp16 KV cache, fp32 logits
            assert _fp32_elements(out / graph) == _fp32_elements(fp16 / graph), graph  # the fp16 trace's fp32 islands only
    last = output.strip().splitlines()[-1]
    if TRT_MISSING is None:
        assert last.startswith("built engine/decode.plan, engine/prefill.plan with TensorRT"), last
    else:
        assert last == (f"wrote the TensorRT-ready ONNX artifact {out}; {TRT_MISSING}: to build TensorRT engines, "
                        f"{INSTALL} (tensorrt-cu13 on CUDA 13), plus torch with CUDA and triton for the MoE plugin, on "
                        f"a machine with an NVIDIA GPU, then run `llama4-export build {out}`")


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT and a GPU are here: --require-engine is satisfied")
@pytest.mark.parametrize("precision", PRECISIONS)
def test_require_engine_fails_in_one_line_before_the_export(tmp_path, precision):
    out = tmp_path / "out"
    result = CliRunner().invoke(export_app, ["--model", "scout-tiny", "--precision", precision, "--target", "tensorrt",
                                             "--out", str(out), "--require-engine", *SMALL_CALIBRATION])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --require-engine: {TRT_MISSING}: to build TensorRT engines, "
                                                   f"{INSTALL}"), result.output
    assert not out.exists()  # nothing exported: the check comes first, not after a long export


def test_engine_options_need_the_tensorrt_target(tmp_path):
    result = CliRunner().invoke(export_app, ["--model", "scout-tiny", "--target", "onnxruntime", "--out", str(tmp_path / "o"),
                                             "--max-batch", "2", "--timing-cache", str(tmp_path / "t.cache")])
    assert result.exit_code == 2
    assert "--max-batch, --timing-cache: engine options apply to --target tensorrt without --no-optimize" in \
        " ".join(result.output.split())


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT and a GPU are here: the no-TensorRT path does not apply")
def test_without_tensorrt_the_line_repeats_the_build_options_and_bad_ones_fail(scout_fp16):
    line = maybe_build_engines(scout_fp16, max_batch=2, window=40, timing_cache="tc.cache", reproducible=True)
    assert line.endswith(f"then run `llama4-export build {scout_fp16} --max-batch 2 --window 40 --timing-cache tc.cache "
                         "--reproducible`")
    read_manifest(scout_fp16)  # untouched and complete
    with pytest.raises(BuildError, match="--window 2: the global KV window needs at least 5 slots"):
        maybe_build_engines(scout_fp16, window=2)
    with pytest.raises(BuildError, match=f"--require-engine: {TRT_MISSING}"):
        maybe_build_engines(scout_fp16, require_engine=True)
    result = CliRunner().invoke(export_app, ["build", str(scout_fp16)])
    assert result.exit_code == 2 and "tensorrt-cu12" in result.output


# -------------------------------------------------------------------------------------------------------- the lint
def test_lint_passes_on_scoutlike_lowered_for_tensorrt(scoutlike_trt, scoutlike_quantized_trt):
    for artifact in (scoutlike_trt, scoutlike_quantized_trt):
        _no_violations(artifact)
        assert _plugin_nodes(artifact / "decode.onnx")  # the experts still run in the plugin, fed by DequantizeLinear
    model = onnx.load(str(scoutlike_quantized_trt / "decode.onnx"), load_external_data=False)
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node), "the quantization passes inserted nothing"


def test_lint_catches_a_dynamic_int4_scale_in_a_real_graph(trt_export):
    artifact, _ = trt_export("scout-tiny", "int4")
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


# ------------------------------------------------------------------------- ORT (plugin via its reference) vs PyTorch
def test_ort_with_plugin_reference_matches_pytorch_fp32(scoutlike_trt):
    comparisons, notes = compare_artifact(scoutlike_trt)
    assert any("ORT-only" in n for n in notes)
    for c in comparisons:
        assert c.reference == "pytorch"
        assert c.deviations["logits"] <= 1e-4, (c.graph, c.worst)
        assert c.worst[1] <= 1e-4, (c.graph, c.worst)


@pytest.mark.parametrize("artifact", ["scout_fp16", "maverick_fp16"])
def test_ort_with_plugin_reference_matches_pytorch_fp16(request, artifact):
    out = request.getfixturevalue(artifact)
    assert _plugin_nodes(out / "decode.onnx") and _plugin_nodes(out / "prefill.onnx")  # the plugin is what runs
    by_graph = {c.graph: c for c in compare_artifact(out)[0]}
    assert {c.reference for c in by_graph.values()} == {"pytorch"}
    assert by_graph["decode"].deviations["logits"] <= 1e-3
    assert by_graph["prefill"].deviations["logits"] <= 1e-3


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
    with pytest.raises(BuildError, match="1 TensorRT conformance violation"):
        maybe_build_engines(broken)  # "TensorRT-ready" is checked, with or without TensorRT


@pytest.mark.parametrize("flags, message", [
    (["--workspace-gib", "nan"], "--workspace-gib nan: must be a positive number of GiB"),
    (["--workspace-gib", "-1"], "--workspace-gib -1: must be a positive number of GiB"),
    (["--reproducible", "--timing-cache", "absent.cache"], "absent.cache: no timing cache to reproduce from"),
])
def test_build_options_are_checked_before_tensorrt_is_looked_for(scout_fp16, flags, message):
    """Bad options fail alike on every machine: they were only checked (or crashed) on one with TensorRT."""
    result = CliRunner().invoke(export_app, ["build", str(scout_fp16), *flags])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert message in result.output, result.output
    assert not (scout_fp16 / "engine").exists()


def test_cli_lint_and_compare_on_a_clean_artifact(scout_fp16):
    result = CliRunner().invoke(export_app, ["lint", str(scout_fp16)])
    assert result.exit_code == 0, result.output
    assert "no violations against TensorRT 10.15" in result.output
    # fp16: every output within two fp16 ulps (ε ≈ 9.8e-4); the logits' 1e-3 bound is checked above
    result = CliRunner().invoke(export_app, ["compare", str(scout_fp16), "--tolerance", "2e-3"])
    assert result.exit_code == 0, result.output
    assert "ORT-only comparison" in result.output and "decode: onnxruntime vs pytorch" in result.output


@pytest.mark.parametrize("damage, message", [
    (lambda graph: graph.unlink(), "decode.onnx: listed in manifest.json but missing"),
    (lambda graph: graph.write_bytes(b"garbage"), "decode.onnx: sha256 does not match manifest.json"),
], ids=["missing", "damaged"])
def test_lint_of_a_missing_or_damaged_graph_is_one_line(tmp_path, scout_fp16, damage, message):
    """Was a FileNotFoundError / protobuf DecodeError traceback."""
    broken = tmp_path / "broken"
    shutil.copytree(scout_fp16, broken)
    damage(broken / "decode.onnx")
    result = CliRunner().invoke(export_app, ["lint", str(broken)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert message in result.output, result.output


def test_running_a_tensorrt_artifact_on_onnxruntime_says_which_backend(scout_fp16):
    """Its MoE is a TensorRT plugin node ONNX Runtime lacks: the one line names --backend tensorrt, not a re-export."""
    result = CliRunner().invoke(run_app, [str(scout_fp16), "--prompt", "The", "-n", "2"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "TensorRT plugin nodes" in result.output and "--backend tensorrt" in result.output
    assert "re-run the export" not in result.output


def test_a_partitioned_tensorrt_export_is_linted_part_by_part_and_says_where_engines_come_from(tmp_path):
    """--partitions N --target tensorrt: each part's graphs and the vision graph pass the lint (a broken one is found
    under its part), and the export, `build` and `llama4-run --backend tensorrt` say in one line that engines need an
    unpartitioned export — `lint` and `build` said the manifest "lists no graphs; re-run the export", and the run
    sent the user to `build`."""
    out = tmp_path / "parts"
    args = ["--checkpoint", str(VISION_FIXTURES / "tiny-a"), "--precision", "fp16", "--target", "tensorrt",
            "--partitions", "2", "--out", str(out)]  # multimodal: the vision graph stays whole, beside the parts
    result = CliRunner().invoke(export_app, args)
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"wrote the TensorRT-ready ONNX artifact {out} in 2 parts;") and "without --partitions" in last
    graphs = {"vision.onnx", *(f"part{k}/{g}" for k in (0, 1) for g in ("decode.onnx", "prefill.onnx"))}
    assert lint_artifact(out) == {name: [] for name in graphs}
    result = CliRunner().invoke(export_app, ["lint", str(out)])
    assert result.exit_code == 0 and all(name in result.output for name in graphs), result.output

    for app, command in ((export_app, ["build", str(out)]),
                         (export_app, ["build", str(out / "part1")]),  # was let through to the TensorRT check
                         (run_app, [str(out), "--prompt", "The", "-n", "2", "--backend", "tensorrt"])):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert "partitioned artifact" in result.output and "without --partitions" in " ".join(result.output.split())
    # ONNX Runtime lacks the parts' plugin op: the advice was "run it with --backend tensorrt", which refuses parts
    result = CliRunner().invoke(run_app, [str(out), "--prompt", "The", "-n", "2"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    said = " ".join(result.output.split())
    assert "TensorRT plugin nodes" in said and "export with --target onnxruntime to run the parts" in said, said
    assert "--backend tensorrt" not in said
    result = CliRunner().invoke(export_app, [*args[:-1], str(tmp_path / "other"), "--max-batch", "2"])
    assert result.exit_code == 2 and "--max-batch with --partitions 2" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "other").exists()

    model = onnx.load(str(out / "part1" / "decode.onnx"), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == trt_plugin_spec.PLUGIN_NAME)
    node.attribute.remove(next(a for a in node.attribute if a.name == "activation"))
    onnx.save(model, str(out / "part1" / "decode.onnx"))
    write_manifest(out / "part1", {k: v for k, v in read_manifest(out / "part1", verify=False).items() if k != "files"})
    found = lint_artifact(out)
    assert [v.rule for v in found["part1/decode.onnx"]] == ["plugin"] and not found["part0/decode.onnx"]


def test_an_int4_trt_fallback_export_passes_the_lint_and_computes_what_the_plugin_does(tmp_path, trt_export):
    """--trt-fallback with int4 experts: the decode graph's gather form fed a Gather with the dequantized experts,
    which TensorRT's weight-only INT4 (DequantizeLinear of a constant into a MatMul) does not take, and the export
    failed its own lint. Decode now uses the dense form there; its outputs equal the plugin artifact's (ONNX Runtime,
    the plugin served by its numpy reference, W4A16 as TensorRT computes: ORT's int8 activations made them differ by
    1.2 %) on the same inputs."""
    plugin, _ = trt_export("scout-tiny", "int4")
    out = tmp_path / "fallback"
    result = CliRunner().invoke(export_app, ["--model", "scout-tiny", *SOURCE, "--precision", "int4", "--target",
                                             "tensorrt", "--trt-fallback", "--out", str(out), *SMALL_CALIBRATION])
    assert result.exit_code == 0, result.output
    _no_violations(out)
    assert not _plugin_nodes(out / "decode.onnx")
    manifest = read_manifest(out)
    config = Llama4Config.from_manifest(manifest, "manifest.json")
    for name, entry in manifest["graphs"].items():
        tokens = entry.get("new_tokens") or 5
        feeds = graph_feeds(config, 2, tokens, config.attention_chunk_size, config.attention_chunk_size + 6, np.float16)
        if entry.get("new_tokens") is None:  # prefill: every token's logits
            feeds[io_spec.LOGITS_INDEX] = np.tile(np.arange(tokens, dtype=np.int64), (2, 1))
        ours, theirs = run_ort(out / entry["file"], feeds), run_ort(plugin / entry["file"], feeds)
        assert max(deviations(ours, theirs).values()) <= 2e-3, name


# --------------------------------------------------------------------------------------------------------- rebuild
def test_rebuild_reproduces_every_file(scout_fp16, tmp_path, monkeypatch, capsys):
    """Into a temp directory, removed after; one a killed rebuild left (no process holds it) goes first. The graphs
    are traced anew, not read back from this process's or the disk's trace cache (which the export filled): a rebuild
    checks the trace too."""
    import tempfile

    from llama4_export.export import onnx_export

    traced = []
    trace = onnx_export._trace_graphs
    monkeypatch.setattr(onnx_export, "_trace_graphs", lambda *args: traced.append(args) or trace(*args))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "llama4-rebuild-killed" / "artifact").mkdir(parents=True)
    (tmp_path / "llama4-rebuild-killed" / "artifact" / "model.data").write_bytes(b"\0" * 4096)
    result = rebuild(scout_fp16)
    assert len(traced) == 1 and traced[0][2] == range(LAYERS), traced
    assert result.identical, result.differences
    assert set(result.compared) == set(read_manifest(scout_fp16)["files"])
    assert "decode.onnx" in result.compared and "model.data" in result.compared
    assert sorted(tmp_path.iterdir()) == []
    assert f"removed llama4-rebuild-killed (0.0 MB) from {tmp_path}: left by a job killed" in " ".join(
        capsys.readouterr().err.split())


def test_rebuild_reports_the_first_difference(scout_fp16):
    """Hashes that differ, or files only one side has: one line each, by file name."""
    from llama4_export.rebuild import compare_hashes

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
