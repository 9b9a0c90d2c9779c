"""Graph passes on whole exported models: the decode graphs of l4-scoutlike and of a random Maverick-style model
(maverick-tiny: MoE every 2nd layer, no QK norm) lose most of their nodes and keep their outputs for every target's
lowering run on ONNX Runtime; an optimized artifact still generates transformers' tokens; the artifact is rewritten
deterministically with one weights file.

The reference for every graph comparison is the exported, unoptimized graph (tests/test_export.py checks it against
our PyTorch model, tests/test_runtime_ort.py against transformers). The TensorRT plugin node runs through its numpy
reference registered as an ONNX Runtime Python op (onnxruntime-extensions, a dev dependency).
"""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from llama4_export.artifact import read_manifest
from llama4_export.model.config import Llama4Config
from llama4_export.cli.export import export_app
from llama4_export.errors import CheckpointError
from llama4_export.export.onnx_export import DECODE, export_graph
from llama4_export.graph_passes.artifact_passes import optimize_artifact
from llama4_export.graph_passes.errors import GraphPassError
from llama4_export.graph_passes.lower import FLOAT_EXPERTS_LOWERING
from llama4_export.runtime.ort_backend import artifact_parts
from llama4_export.graph_passes.manager import op_histogram
from llama4_export.graph_passes.pipeline import optimize
from llama4_export.graph_passes.manager import report_tables
from llama4_export.graph_passes.verify import executable_copy, reference_ops_available, sample_feeds
from llama4_export.rebuild import rebuild
from llama4_export.weights import from_preset
from llama4_export.runtime import Generator

from .conftest import run_with_file_size_limit

TOLERANCE = 1e-4  # × max |output|, the bound for logits
NEW_TOKENS = 64
# (target, TensorRT plugin node?) — each target's lowering
LOWERINGS = [("onnxruntime", True), ("tensorrt", True), ("tensorrt", False)]


@pytest.fixture(scope="module")
def optimized_scoutlike(scoutlike_artifact, tmp_path_factory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("passes") / "scoutlike-onnxruntime"
    shutil.copytree(scoutlike_artifact, out)
    manifest, reports = optimize_artifact(out, "onnxruntime", verify=True, show_progress=False)
    return out, manifest, reports


@pytest.fixture(scope="module")
def maverick_decode(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("maverick") / "decode.onnx"
    ir.save(export_graph(from_preset("maverick-tiny", seed=0), DECODE), path, external_data="decode.data")
    return path


def _config(model: ir.Model) -> tuple[int, list[int]]:
    """(layer count, MoE layers) as the graph's weight names reveal them: how often the rules must fire."""
    names = set(model.graph.initializers)
    layers = 1 + max(int(n.split(".")[2]) for n in names if n.startswith("model.layers."))
    return layers, [i for i in range(layers) if f"model.layers.{i}.feed_forward.router.weight" in names]


def run_graph(model: ir.Model, feeds: dict[str, np.ndarray], tmp: Path) -> dict[str, np.ndarray]:
    runnable, library = executable_copy(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if library:
        options.register_custom_ops_library(library)
    tmp.mkdir(parents=True, exist_ok=True)
    ir.save(runnable, tmp / "m.onnx", external_data="m.data")
    session = ort.InferenceSession(str(tmp / "m.onnx"), options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def assert_outputs_kept(optimized: dict, reference: dict) -> None:
    assert optimized.keys() == reference.keys()
    for name, ref in reference.items():
        error = np.abs(optimized[name] - ref).max() / np.abs(ref).max()
        assert error <= TOLERANCE, f"{name}: moved by {error:.2e} × max|{name}|"


def print_report(name: str, report) -> None:
    console = Console(width=200)
    for table in report_tables(name, report.to_json(measured=True)):
        console.print(table)


# ------------------------------------------------------------------------------------------------ decode graphs
@pytest.mark.parametrize("target, plugin", LOWERINGS, ids=["onnxruntime", "tensorrt-plugin", "tensorrt-fallback"])
@pytest.mark.parametrize("which", ["scoutlike", "maverick"])
def test_decode_graph_shrinks_and_keeps_its_outputs(which, target, plugin, request, tmp_path):
    path = request.getfixturevalue("scoutlike_artifact") / "decode.onnx" if which == "scoutlike" else request.getfixturevalue("maverick_decode")
    if plugin and target == "tensorrt" and not reference_ops_available():
        pytest.skip("onnxruntime-extensions (dev dependency) runs the plugin node's reference on ONNX Runtime")
    original = ir.load(path)
    feeds = sample_feeds(original, seed=3)
    reference = run_graph(original, feeds, tmp_path / "original")
    _, moe_layers = _config(original)

    model, report = optimize(ir.load(path), target, trt_plugin=plugin)
    print_report(f"{which} decode", report)
    # main-graph nodes: an If's branch runs only when taken (of a layer's per-expert Ifs, one per token)
    before, after = len(list(original.graph)), len(list(model.graph))
    assert after <= 2 / 3 * before, f"{before} → {after} nodes"
    ops_after = op_histogram(model)
    assert ops_after["ai.llama4export::Llama4MoE"] == 0
    if target == "onnxruntime":
        assert report.moe_lowering == FLOAT_EXPERTS_LOWERING and ops_after["com.microsoft::MoE"] == 0
        assert ops_after["com.microsoft::RotaryEmbedding"] > 0 and ops_after["com.microsoft::SkipSimplifiedLayerNormalization"] > 0
        assert ops_after["RMSNormalization"] > 0 and model.opset_imports[""] == 23
    elif plugin:
        assert ops_after["trt.plugins::Llama4MoEPlugin"] == len(moe_layers) and model.opset_imports[""] == 23
        assert ops_after["RMSNormalization"] > 0 and ops_after["RotaryEmbedding"] > 0
    else:
        assert report.moe_lowering == "standard ops (gather)" and ops_after["trt.plugins::Llama4MoEPlugin"] == 0
    assert_outputs_kept(run_graph(model, feeds, tmp_path / "optimized"), reference)


@pytest.mark.parametrize("which", ["scoutlike", "maverick"])
def test_every_rule_fires_as_the_architecture_says_and_moves_no_output(which, request):
    path = request.getfixturevalue("scoutlike_artifact") / "decode.onnx" if which == "scoutlike" else request.getfixturevalue("maverick_decode")
    original = ir.load(path)
    layers, moe_layers = _config(original)
    rope_layers = [i for i in range(layers) if (i + 1) % 4]  # NoPE every 4th layer in both models
    qk_norm = which == "scoutlike"
    _, report = optimize(original, "onnxruntime", verify=True)
    rewrites = {r.name: r.rewrites for r in report.records}
    assert rewrites["fuse_moe_gather"] == len(moe_layers) and rewrites["fuse_moe_dense"] == 0
    assert rewrites["fuse_rms_norm"] == 2 * layers + 1  # two per layer and the final norm
    assert rewrites["fuse_unweighted_rms_norm"] == (2 * len(rope_layers) if qk_norm else 0)
    assert rewrites["fuse_skip_rms_norm"] == 2 * layers  # every norm but the first reads a residual sum
    assert rewrites["fuse_rope"] == 2 * len(rope_layers)
    assert rewrites["lower_moe"] == len(moe_layers)
    for record in report.records:
        assert record.deviation is not None and record.deviation <= TOLERANCE, (record.name, record.deviation)
        if record.rewrites and record.name.startswith("fuse"):
            assert record.changes, record.name  # a rule that fired changed the op histogram


# ----------------------------------------------------------------------------------------------- the artifact
def test_optimized_prefill_runs_one_if_per_expert_and_keeps_outputs(optimized_scoutlike, scoutlike_artifact, tmp_path):
    out, manifest, reports = optimized_scoutlike
    optimized = ir.load(out / "prefill.onnx")
    original = ir.load(scoutlike_artifact / "prefill.onnx")
    layers, moe_layers = _config(original)
    experts = original.graph.initializers[f"model.layers.{moe_layers[0]}.feed_forward.experts.gate_up_proj"].shape[0]
    ops_after = op_histogram(optimized)
    assert manifest["graphs"]["prefill"]["moe_lowering"] == FLOAT_EXPERTS_LOWERING
    expert_ifs = [n for n in optimized.graph if n.op_type == "If"
                  and {m.op_type for m in n.attributes["then_branch"].value} >= {"GatherND", "MatMul", "ScatterND"}]
    assert len(expert_ifs) == experts * len(moe_layers) and ops_after["com.microsoft::MoE"] == 0
    # No node computes with every expert's weights: each expert's own weights are read by one MatMul in its If.
    expert_weights = [v for v in optimized.graph.initializers.values() if "experts" in v.name]
    assert len(expert_weights) == 2 * experts * len(moe_layers)
    for value in expert_weights:
        assert [(u.node.op_type, u.node.graph is optimized.graph) for u in value.uses()] == [("MatMul", False)], value.name
    feeds = sample_feeds(original, seed=4)
    assert feeds["input_ids"].shape[1] > 1
    assert_outputs_kept(run_graph(optimized, feeds, tmp_path / "optimized"), run_graph(original, feeds, tmp_path / "original"))
    assert reports["prefill"].max_deviation <= TOLERANCE and reports["decode"].max_deviation <= TOLERANCE


def test_one_session_serves_both_graphs_of_an_optimized_artifact(optimized_scoutlike):
    """Its MoE routes each token to its expert in both graphs, so the runtime runs decode steps through the prefill
    graph and ONNX Runtime prepacks every weight once (two sessions, each with its packed copies: the rand200m-long
    fp32 artifact's peak RSS was 1,830 MB instead of 1,003)."""
    out, manifest, _ = optimized_scoutlike
    (part,), _ = artifact_parts(out, manifest, Llama4Config.from_manifest(manifest, str(out)))
    assert part.decode == part.prefill


def test_optimized_artifact_generates_transformers_greedy_tokens(optimized_scoutlike, scoutlike_dir, heldout_text):
    from transformers import Llama4ForCausalLM

    out, _, _ = optimized_scoutlike
    generator = Generator.load(out, backend="onnxruntime", threads=2)
    prompt = generator.encode(heldout_text[:3000])[:100]
    model = Llama4ForCausalLM.from_pretrained(scoutlike_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt):].tolist()
    result = generator.generate(prompt, max_new_tokens=NEW_TOKENS)
    assert len(expected) == NEW_TOKENS and result.token_ids == expected


def test_an_artifact_optimized_with_verify_rebuilds_identically(optimized_scoutlike, scoutlike_dir, tmp_path):
    """`passes --verify` records a verified tolerance and verified passes; the rebuild did not replay the verification,
    so such an artifact was "not reproducible" (passes.json and manifest.json differed)."""
    out, manifest, _ = optimized_scoutlike
    assert manifest["graph_passes"]["verified_tolerance"] == TOLERANCE
    # A checkpoint whose tokenizer files changed was found out only after a whole export: now refused before it.
    changed = shutil.copytree(scoutlike_dir, tmp_path / "changed")
    (changed / "tokenizer_config.json").write_text((changed / "tokenizer_config.json").read_text().replace("\n", " "))
    with pytest.raises(CheckpointError, match="tokenizer_config.json: missing or not the file the artifact was exported from"):
        rebuild(out, checkpoint=changed, show_progress=False)
    shutil.copyfile(scoutlike_dir / "tokenizer_config.json", changed / "tokenizer_config.json")
    (changed / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(CheckpointError, match="chat_template.jinja: the checkpoint the artifact was exported from had"):
        rebuild(out, checkpoint=changed, show_progress=False)
    result = rebuild(out, checkpoint=scoutlike_dir, show_progress=False)
    assert result.identical, result.differences


def test_optimize_artifact_is_deterministic_and_keeps_one_weights_file(optimized_scoutlike, scoutlike_artifact, tmp_path):
    out, manifest, _ = optimized_scoutlike
    again = tmp_path / "again"
    shutil.copytree(scoutlike_artifact, again)
    optimize_artifact(again, "onnxruntime", verify=True, show_progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in again.iterdir()) and "passes.json" in names
    _, mismatch, errors = filecmp.cmpfiles(out, again, names, shallow=False)
    assert not mismatch and not errors
    assert read_manifest(out)["graph_passes"]["target"] == "onnxruntime"  # verify=True: every sha256 matches
    # Both graphs point into the one data file, which holds no more than the export's (each tensor once).
    for graph in ("decode.onnx", "prefill.onnx"):
        locations = {v.const_value.location for v in ir.load(out / graph).graph.initializers.values()
                     if isinstance(v.const_value, ir.ExternalTensor)}
        assert locations == {manifest["external_data"]}
    data = manifest["external_data"]
    assert (out / data).stat().st_size <= (scoutlike_artifact / data).stat().st_size
    report = json.loads((out / "passes.json").read_text())
    assert report["decode"]["nodes_after"] < report["decode"]["nodes_before"]
    # The totals count If branches; the main graph's count is what a step runs around them, as onnx reads the file.
    for graph in ("decode", "prefill"):
        main_nodes = len(onnx.load(out / f"{graph}.onnx", load_external_data=False).graph.node)
        assert report[graph]["main_graph_nodes_after"] == main_nodes < report[graph]["nodes_after"]


def test_compare_checks_an_optimized_artifact_against_pytorch_on_its_checkpoint(optimized_scoutlike, scoutlike_dir,
                                                                               tmp_path):
    """The passes fuse the experts' weights, so the PyTorch reference cannot be rebuilt from the graphs: compare
    failed on every default export, advising flags it does not have. It now takes the checkpoint the manifest
    records (hashes checked) and compares every graph with our PyTorch model on it."""
    from llama4_export.evaluation.compare import compare_artifact

    out, _, _ = optimized_scoutlike
    runner = CliRunner()
    asked = runner.invoke(export_app, ["compare", str(out)])
    assert asked.exit_code == 2 and "exported from checkpoint" in asked.output and "pass its directory with " \
        "--checkpoint" in asked.output, asked.output
    (tmp_path / "config.json").write_bytes((scoutlike_dir / "config.json").read_bytes())  # not the weights
    wrong = runner.invoke(export_app, ["compare", str(out), "--checkpoint", str(tmp_path)])
    assert wrong.exit_code == 2 and "missing or not the file the artifact was exported from" in wrong.output
    shown = runner.invoke(export_app, ["compare", str(out), "-c", str(scoutlike_dir)], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "decode: onnxruntime vs pytorch" in shown.output and "prefill: onnxruntime vs pytorch" in shown.output
    # it sent the user to `build`, which refuses an onnxruntime artifact
    assert "lowered for onnxruntime (no TensorRT engines)" in " ".join(shown.output.split()), shown.output
    comparisons, notes = compare_artifact(out, checkpoint=scoutlike_dir)
    assert sorted(c.graph for c in comparisons) == ["decode", "prefill"]
    assert all(c.reference == "pytorch" and 0 < c.worst[1] < 1e-4 for c in comparisons), comparisons
    assert f"PyTorch reference: checkpoint {scoutlike_dir}" in " ".join(notes)


def test_cli_passes_reports_and_refuses_bad_input_in_one_line(optimized_scoutlike, scoutlike_artifact, tmp_path):
    out, _, _ = optimized_scoutlike
    runner = CliRunner()
    shown = runner.invoke(export_app, ["passes", str(out), "--report"], terminal_width=200)
    assert shown.exit_code == 0 and "fuse_moe_gather" in shown.output and "If + MatMul per expert" in shown.output
    decode = json.loads((out / "passes.json").read_text())["decode"]
    assert f"main graph {decode['main_graph_nodes_before']} → {decode['main_graph_nodes_after']}" in shown.output
    again = runner.invoke(export_app, ["passes", str(out)])
    assert again.exit_code == 2 and "already optimized" in again.output and len(again.output.strip().splitlines()) == 1
    fresh = tmp_path / "fresh"
    shutil.copytree(scoutlike_artifact, fresh)
    bad = runner.invoke(export_app, ["passes", str(fresh), "--target", "tensorrt-llm"])
    assert bad.exit_code == 2 and "unknown target 'tensorrt-llm'" in bad.output and len(bad.output.strip().splitlines()) == 1
    assert not (fresh / "passes.json").exists()
    # was exit 0 and graphs keeping ONNX Runtime's GroupQueryAttention, which the lint and build then refused
    lowered = runner.invoke(export_app, ["passes", str(fresh), "--target", "tensorrt"])
    assert lowered.exit_code == 2 and "traced for ONNX Runtime" in lowered.output and "--no-optimize --target " \
        "tensorrt" in lowered.output and len(lowered.output.strip().splitlines()) == 1, lowered.output
    assert not (fresh / "passes.json").exists()
    fallback = runner.invoke(export_app, ["passes", str(fresh), "--trt-fallback"])  # its default target: onnxruntime
    assert fallback.exit_code == 2 and "this export was traced for onnxruntime" in fallback.output, fallback.output
    # was "after pass 'fold_constants' output '' moved by 0 × its max magnitude (tolerance -1); the pass is wrong"
    negative = runner.invoke(export_app, ["passes", str(fresh), "--verify", "--tolerance", "-1"])
    assert negative.exit_code == 2 and negative.output.strip() == "error: --tolerance -1: must be >= 0 (an output's " \
        "deviation relative to its max magnitude)", negative.output
    assert not (fresh / "passes.json").exists()
    # a graph the manifest's hashed `files` do not list (here another artifact's) was optimized, or compared, unverified
    original = (fresh / "manifest.json").read_text()
    edited = json.loads(original)
    edited["graphs"]["decode"]["file"] = f"../{scoutlike_artifact.name}/decode.onnx"
    (fresh / "manifest.json").write_text(json.dumps(edited))
    for command in (["passes", str(fresh)], ["compare", str(fresh)]):
        outside = runner.invoke(export_app, command)
        assert outside.exit_code == 2 and f"graphs.decode.file='../{scoutlike_artifact.name}/decode.onnx': not a file " \
            "the artifact lists in `files`" in outside.output and len(outside.output.strip().splitlines()) == 1, outside.output
    (fresh / "manifest.json").write_text(original)
    # a file the user put in the artifact was dropped by the in-place rewrite (it copies the manifest's files)
    (fresh / "NOTES.md").write_text("keep me")
    kept = runner.invoke(export_app, ["passes", str(fresh)])
    assert kept.exit_code == 2 and "also holds 'NOTES.md'" in kept.output and len(kept.output.strip().splitlines()) == 1
    assert (fresh / "NOTES.md").read_text() == "keep me" and not (fresh / "passes.json").exists()
    (fresh / "NOTES.md").unlink()
    compared = runner.invoke(export_app, ["compare", str(fresh), "--tolerance", "-0.5"])
    assert compared.exit_code == 2 and "--tolerance -0.5: must be >= 0" in compared.output, compared.output
    with pytest.raises(GraphPassError, match="already optimized"):
        optimize_artifact(out, "tensorrt", show_progress=False)


def test_passes_past_the_file_size_limit_is_one_line_and_keeps_the_artifact(scoutlike_artifact, tmp_path):
    """A full disk or a file size limit (EFBIG here, as FAT32 gives past 4 GB) while `passes` writes model.data was a
    traceback; now one line naming the directory, exit 2, and the unoptimized artifact as it was."""
    directory = tmp_path / "a"
    shutil.copytree(scoutlike_artifact, directory)
    done = run_with_file_size_limit(1_000_000, "passes", str(directory))
    lines = [line for line in done.stderr.splitlines() if line.startswith(("error", "Traceback"))]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: {directory}: a file outgrew the largest the file system or `ulimit -f` allows")
    assert list(tmp_path.iterdir()) == [directory]
    assert not filecmp.dircmp(scoutlike_artifact, directory).diff_files
    assert "graph_passes" not in read_manifest(directory)  # still the traced graphs, every hash matching


def test_stored_pass_reports_refuses_a_directory_that_is_not_a_path_in_one_line():
    from llama4_export import api

    with pytest.raises(GraphPassError, match=r"^stored_pass_reports\(directory=None\): expected an artifact directory"):
        api.stored_pass_reports(None)  # was pathlib's TypeError
