"""--partitions N: contiguous layer ranges, each its own graphs and KV-cache inputs, chained through hidden states by
the one ONNX Runtime backend; same greedy tokens as the PyTorch reference, and at every precision the same tokens as
the unpartitioned export."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest

from llama4_export import api
from llama4_export.evaluation.torch_backend import TorchBackend
from llama4_export.model import get_preset, io_spec
from llama4_export.model.io_spec import HIDDEN_IN, HIDDEN_OUT
from llama4_export.runtime import Generator
from llama4_export.weights import from_config

# maverick-tiny's first 4 layers: dense and MoE layers, chunked and global (NoPE layer 3) attention
SOURCE = dict(model="maverick-tiny", random_weights=True, layers=4, seed=5, target="onnxruntime", show_progress=False)


@pytest.fixture(scope="module")
def model():
    return from_config(get_preset("maverick-tiny", 4), seed=5)


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory):
    out = tmp_path_factory.mktemp("partitions") / "p2"
    api.export_model(out, partitions=2, **SOURCE)
    return out


def test_parts_hold_their_own_layers_and_chain_hidden_states(partitioned):
    parts = Generator.load(partitioned).backend.parts
    assert [list(part.layers) for part in parts] == [[0, 1], [2, 3]]
    first = onnx.load(str(partitioned / "part0" / "decode.onnx"), load_external_data=False).graph
    second = onnx.load(str(partitioned / "part1" / "decode.onnx"), load_external_data=False).graph
    assert [i.name for i in first.input][:1] == [io_spec.INPUT_IDS] and [o.name for o in first.output][0] == HIDDEN_OUT
    assert [i.name for i in second.input][:1] == [HIDDEN_IN] and [o.name for o in second.output][0] == io_spec.LOGITS
    assert {i.name for i in second.input if i.name.startswith("past_key")} == {"past_key.2", "past_key.3"}
    weights = {i.name for i in second.initializer}
    assert not any(name.startswith("model.layers.0.") for name in weights) and "lm_head.weight.T" in weights
    # the top-level manifest said opset 21 (the trace's) and external_data model.data, which only the parts hold
    import json

    manifest = json.loads((partitioned / "manifest.json").read_text())
    opsets = {o.version for part in ("part0", "part1") for o in onnx.load(
        str(partitioned / part / "decode.onnx"), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")}
    assert manifest["opset"] == max(opsets) and "external_data" not in manifest


def test_every_file_of_every_part_is_verified_its_manifest_too(partitioned, tmp_path):
    """The top-level manifest lists each part's files and, since a part's manifest.json was left out, the part's
    manifest itself: an edited one (here the graphs it names) is refused at load like any damaged file."""
    import json
    import shutil

    from llama4_export.artifact import ArtifactError

    listed = set(json.loads((partitioned / "manifest.json").read_text())["files"])
    on_disk = {p.relative_to(partitioned).as_posix() for p in partitioned.rglob("*") if p.is_file()}
    assert listed == on_disk - {"manifest.json"} and {"part0/manifest.json", "part1/manifest.json"} <= listed
    edited = shutil.copytree(partitioned, tmp_path / "edited")
    part = json.loads((edited / "part1" / "manifest.json").read_text())
    part["graphs"]["decode"]["file"] = "prefill.onnx"
    (edited / "part1" / "manifest.json").write_text(json.dumps(part))
    with pytest.raises(ArtifactError, match="part1/manifest.json: sha256 does not match manifest.json"):
        Generator.load(edited)


def test_partitioned_greedy_tokens_equal_the_pytorch_model(partitioned, model):
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, 256, 21)]  # crosses the 16-token chunk
    parts = Generator.load(partitioned, window=64)
    reference = Generator(TorchBackend(model), window=64)
    got = parts.generate(prompt, max_new_tokens=24, stop_tokens=[]).token_ids
    assert got == reference.generate(prompt, max_new_tokens=24, stop_tokens=[]).token_ids


def test_int4_partitions_generate_what_the_unpartitioned_int4_export_does(tmp_path):
    """Quantization is an option of the one pipeline: int4 (RTN) partitioned, report included, same greedy tokens."""
    quant = api.QuantOptions(int4_algo="rtn")
    whole = api.export_model(tmp_path / "whole", precision="int4", quant=quant, **SOURCE)
    parts = api.export_model(tmp_path / "parts", precision="int4", quant=quant, partitions=2, **SOURCE)
    assert parts.manifest["quantization"]["algorithm"] == "rtn"
    # the report of the parts chained is the one of the whole graph (random weights: agreement is modest either way)
    assert parts.accuracy_report["top1_agreement"] == whole.accuracy_report["top1_agreement"]
    assert parts.accuracy_report["kl_mean"] == pytest.approx(whole.accuracy_report["kl_mean"], rel=1e-3)
    part1 = onnx.load(str(tmp_path / "parts" / "part1" / "decode.onnx"), load_external_data=False).graph
    assert any(n.op_type == "MatMulNBits" and n.input[1] in {t.name for t in part1.initializer}
               for n in part1.node)  # 4-bit weights in the part
    prompt = [int(t) for t in np.random.default_rng(2).integers(0, 256, 19)]
    tokens = [Generator.load(tmp_path / name, window=64).generate(prompt, max_new_tokens=16, stop_tokens=[]).token_ids
              for name in ("whole", "parts")]
    assert tokens[0] == tokens[1]


def test_fp8_kv_cache_partitions_generate_what_the_unpartitioned_export_does(tmp_path):
    """Each part's graph quantizes only its own layers' caches (the calibrated scales cover every layer)."""
    quant = api.QuantOptions(report=False, kv_cache_dtype="fp8", calib_cache=tmp_path / "calib.safetensors",
                             calib_samples=4, calib_seq_len=32)
    for name, partitions in (("whole", 1), ("parts", 2)):
        api.export_model(tmp_path / name, precision="fp8", quant=quant, partitions=partitions, **SOURCE)
    part1 = onnx.load(str(tmp_path / "parts" / "part1" / "decode.onnx"), load_external_data=False).graph
    float8 = {i.name for i in part1.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT8E4M3FN}
    assert float8 == {"past_key.2", "past_key.3", "past_value.2", "past_value.3"}
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, 256, 21)]
    tokens = [Generator.load(tmp_path / name, window=64).generate(prompt, max_new_tokens=16, stop_tokens=[]).token_ids
              for name in ("whole", "parts")]
    assert tokens[0] == tokens[1]


def test_bench_counts_the_weights_of_every_part(partitioned, model):
    """The roofline's bytes per decode step over the parts' graphs; reference: the PyTorch model's parameters at fp32,
    routed experts divided by their count, the embedding one row (as tests/test_bench.py counts a whole artifact)."""
    config = model.config
    expected = 0
    for name, tensor in model.state_dict().items():
        numel = tensor.numel()
        if ".experts." in name:
            numel //= config.num_local_experts
        elif "embed_tokens" in name:
            numel //= config.vocab_size
        expected += 4 * numel
    result = api.bench_artifact(partitioned, [8], decode_prompt=8, new_tokens=3, repeats=1, threads=1)
    measured = result["roofline"]["weight_bytes_per_token"]
    assert expected <= measured <= expected * 1.05, (measured, expected)


def test_compare_refuses_a_partitioned_artifact_in_one_line(partitioned):
    from typer.testing import CliRunner

    from llama4_export.cli.export import export_app

    result = CliRunner().invoke(export_app, ["compare", str(partitioned)])
    assert result.exit_code == 2 and "a partitioned artifact (2 parts)" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_running_one_part_names_the_artifact_to_run(partitioned):
    """llama4-run PART said "artifact has no tokenizer.json; pass token ids instead (--ids)"; with ids its graphs
    (which take hidden states) would not have run either."""
    import json

    from typer.testing import CliRunner

    from llama4_export.cli.run import run_app

    part = partitioned / json.loads((partitioned / "manifest.json").read_text())["partitions"][0]["directory"]
    result = CliRunner().invoke(run_app, [str(part), "--prompt", "hi"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {part}: one part (layers 0..") and lines[0].endswith(
        f"of a partitioned artifact; run the artifact directory holding it ({partitioned.resolve()})")
    # inspect reported the whole model (every layer and parameter) under the part's name
    from llama4_export.cli.export import export_app

    result = CliRunner().invoke(export_app, ["inspect", "-c", str(part)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "one part (layers 0..1) of a partitioned artifact; inspect " \
        f"the artifact directory holding it ({partitioned.resolve()})" in lines[0], result.output


def test_passes_reports_every_part_and_refuses_to_optimize_a_partitioned_artifact(partitioned):
    """`passes --report` said "not optimized yet; run passes", and `passes` then said "lists no graphs": the reports
    live in the parts."""
    import json

    from typer.testing import CliRunner

    from llama4_export.cli.export import export_app

    reports = api.stored_pass_reports(partitioned)
    stored = {f"part{k}/{name}": report for k in range(2)
              for name, report in json.loads((partitioned / f"part{k}" / "passes.json").read_text()).items()}
    assert reports == stored and sorted(reports) == ["part0/decode", "part0/prefill", "part1/decode", "part1/prefill"]
    shown = CliRunner().invoke(export_app, ["passes", str(partitioned), "--report"])
    assert shown.exit_code == 0 and "part1/prefill" in shown.output, shown.output

    before = (partitioned / "manifest.json").read_bytes()
    result = CliRunner().invoke(export_app, ["passes", str(partitioned)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "a partitioned artifact (2 parts): the export optimizes each part" in result.output
    assert (partitioned / "manifest.json").read_bytes() == before


def test_a_bad_partitions_entry_is_refused_in_one_line_naming_it(partitioned, tmp_path):
    """Entries were used unchecked: overlapping ranges or a part listed twice crashed (RuntimeError, KeyError), a
    string bound a TypeError, and "../other/part0" or an absolute directory ran another artifact's graphs."""
    import json
    import shutil

    from typer.testing import CliRunner

    from llama4_export.cli.run import run_app
    from llama4_export.errors import Llama4ExportError

    edited = shutil.copytree(partitioned, tmp_path / "edited")
    original = json.loads((partitioned / "manifest.json").read_text())
    other = str(partitioned / "part0")
    cases = {  # (partitions[0], partitions[1]) edits -> what the error names
        "layers [0, 3], [3, 4]": ({"layers": [0, 3]}, {"layers": [3, 4]}, "part0/manifest.json: layers=[0, 2]"),
        "part1 twice": ({"directory": "part1"}, {}, "partitions[1].directory='part1': a second entry"),
        "a string layer": ({"layers": [0, "2"]}, {}, "partitions[0].layers=[0, '2']"),
        "a sibling artifact": ({"directory": "../p2/part0"}, {}, "partitions[0].directory='../p2/part0'"),
        "an absolute directory": ({"directory": other}, {}, f"partitions[0].directory={other!r}"),
        "a gap": ({}, {"layers": [3, 4]}, "partitions[1].layers=[3, 4]"),
        "short of the last layer": ({}, {"layers": [2, 3]}, "the parts end at layer 2, not 3"),
    }
    for case, (first, second, named) in cases.items():
        manifest = json.loads(json.dumps(original))
        manifest["partitions"][0].update(first)
        manifest["partitions"][1].update(second)
        (edited / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(Llama4ExportError, match=re.escape(named)):
            Generator.load(edited)
    result = CliRunner().invoke(run_app, [str(edited), "--ids", "1,2"])  # the last case
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "manifest.json: partitions" in lines[0], result.output
