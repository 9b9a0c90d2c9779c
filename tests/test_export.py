"""The ONNX export stage: exported graphs on ONNX Runtime against our PyTorch model, deterministic bytes, one shared
weights file, decode reading one expert, the artifact directory, tokenizer files and CLI errors.

Exports are slow (~15 s per graph on 2 cores), so each model is exported once per session: scout-tiny through the CLI,
l4-scoutlike through the Python API, and a 2-layer checkpoint twice for the reproducibility check.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from llama4_export import api
from llama4_export.artifact import atomic_directory, read_manifest
from llama4_export.cli.export import export_app
from llama4_export.evaluation.torch_backend import torch_generator
from llama4_export.model import get_preset, io_spec
from llama4_export.model.summary import default_block_size
from llama4_export.pipeline import artifact_weight_bytes
from llama4_export.model.modeling import KVCache
from llama4_export.runtime import Generator
from llama4_export.runtime.batching import EngineOptions as BatchOptions
from llama4_export.weights import CheckpointWeights, from_config, from_preset, load

from .conftest import initializer_bytes, make_hf_checkpoint, run_with_file_size_limit

GRAPH_FILES = ("decode.onnx", "prefill.onnx")
MAX_PREFILL = 64


# ----------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "scout-tiny-fp32"
    result = CliRunner().invoke(
        export_app, ["--model", "scout-tiny", "--precision", "fp32", "--max-prefill", str(MAX_PREFILL), "--out", str(out), "--no-optimize"]
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def two_layer_checkpoint(tmp_path_factory) -> Path:
    """Saved by transformers: one chunked layer, one NoPE layer, every layer MoE."""
    directory = tmp_path_factory.mktemp("ckpt") / "two-layer"
    return make_hf_checkpoint(directory, seed=3, dtype=torch.float32, num_hidden_layers=2, no_rope_layers=[1, 0])


# ----------------------------------------------------------------------------------------------------- helpers
def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(graph: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The graph's outputs; a prefill graph is asked for every token's logits (logits_index = all columns)."""
    if io_spec.LOGITS_INDEX in {i.name for i in graph.get_inputs()}:
        batch, tokens = inputs[io_spec.INPUT_IDS].shape
        inputs = {**inputs, io_spec.LOGITS_INDEX: np.tile(np.arange(tokens, dtype=np.int64), (batch, 1))}
    return graph.run(None, inputs)


def feeds(config, ids, positions, chunked_positions, global_positions, keys, values) -> dict[str, np.ndarray]:
    inputs = {
        io_spec.INPUT_IDS: ids.numpy(),
        io_spec.POSITIONS: positions.numpy(),
        io_spec.PAST_POSITIONS["chunked"]: chunked_positions.numpy(),
        io_spec.PAST_POSITIONS["global"]: global_positions.numpy(),
    }
    for i in range(config.num_hidden_layers):
        inputs[io_spec.past_key(i)] = keys[i].numpy()
        inputs[io_spec.past_value(i)] = values[i].numpy()
    return inputs


def empty_in_place_feeds(config, ids, positions) -> dict[str, np.ndarray]:
    """In-place inputs for a first step: empty buffers with room for the step's tokens."""
    batch, tokens = ids.shape
    inputs = {io_spec.INPUT_IDS: ids.numpy(), io_spec.POSITIONS: positions.numpy()}
    for name in io_spec.PAST_LENGTHS.values():
        inputs[name] = np.zeros(batch, np.int64)
    for i in range(config.num_hidden_layers):
        for name in (io_spec.past_key(i), io_spec.past_value(i)):
            inputs[name] = np.zeros((batch, config.num_key_value_heads, tokens, config.head_dim), np.float32)
    return inputs


def assert_in_place_close(config, graph: ort.InferenceSession, outputs: list[np.ndarray], logits, new, rel: float) -> None:
    """A first step's outputs: the logits, and the buffers holding exactly the new K/V."""
    got = dict(zip([o.name for o in graph.get_outputs()], outputs))
    assert_close("logits", got[io_spec.LOGITS], logits, rel)
    for i in range(config.num_hidden_layers):
        assert_close(io_spec.present_key(i), got[io_spec.present_key(i)], new.keys[i], rel)
        assert_close(io_spec.present_value(i), got[io_spec.present_value(i)], new.values[i], rel)


def assert_close(name: str, ours: np.ndarray, ref: torch.Tensor, rel: float) -> None:
    ref = ref.float().numpy()
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
    err, bound = np.abs(ours.astype(np.float32) - ref).max(), rel * np.abs(ref).max()
    assert err <= bound, f"{name}: max-abs diff {err:.3g} > {bound:.3g} (= {rel} × max|ref|)"


def assert_outputs_close(config, outputs: list[np.ndarray], logits: torch.Tensor, new, rel: float) -> None:
    names = io_spec.output_names(config)
    got = dict(zip(names, outputs))
    assert got[io_spec.LOGITS].dtype == np.float32
    assert_close("logits", got[io_spec.LOGITS], logits, rel)
    for i in range(config.num_hidden_layers):
        assert_close(io_spec.new_key(i), got[io_spec.new_key(i)], new.keys[i], rel)
        assert_close(io_spec.new_value(i), got[io_spec.new_value(i)], new.values[i], rel)


def check_against_pytorch(artifact: Path, model, rel: float = 1e-4, kv_dtype=torch.float32) -> None:
    """The artifact's graphs against the eager model, in the KV layout they were exported with."""
    prefill = session(artifact / "prefill.onnx")
    if io_spec.kv_layout_of({i.name for i in prefill.get_inputs()}) == "in_place":
        check_in_place_against_pytorch(artifact, model, rel, kv_dtype)
    else:
        check_positions_against_pytorch(artifact, model, rel, kv_dtype)


def check_in_place_against_pytorch(artifact: Path, model, rel: float, kv_dtype) -> None:
    """Steps as the runtime feeds in-place graphs — a batch of two from empty buffers, then one row at a time up to
    the chunk boundary and past it, then a batched decode step — against one eager forward over the whole sequences
    (the reference). Before each step the buffers hold each row's valid slots first (chunked layers: the current
    chunk in order; global layers: every past token in a rotated order) and garbage after them; the step's logits
    and the K/V the graph writes at slots filled.. must match."""
    config = model.config
    chunk = config.attention_chunk_size
    batch, first, second = 2, chunk - 3, 6
    total = first + second + 1
    ids = torch.randint(0, config.vocab_size, (batch, total), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(total).expand(batch, total)
    with torch.no_grad():
        logits, new = model(ids, positions, KVCache.empty(config, batch, model.lm_head.weight.dtype))
    heads, dim, capacity = config.num_key_value_heads, config.head_dim, chunk + 8
    order = np.roll(np.arange(total), 5)
    graphs = {"prefill": session(artifact / "prefill.onnx"), "decode": session(artifact / "decode.onnx")}
    steps = [("prefill", [0, 1], 0, first)] + [("prefill", [b], first, chunk) for b in range(batch)] + \
        [("prefill", [b], chunk, first + second) for b in range(batch)] + [("decode", [0, 1], first + second, total)]
    for graph, rows, begin, end in steps:
        start = begin // chunk * chunk
        held = {"chunked": np.arange(start, begin), "global": order[order < begin]}
        garbage = np.random.default_rng(begin).standard_normal((len(rows), heads, capacity, dim))
        inputs = {io_spec.INPUT_IDS: ids[rows, begin:end].numpy(), io_spec.POSITIONS: positions[rows, begin:end].numpy()}
        for kind, slots in held.items():
            inputs[io_spec.PAST_LENGTHS[kind]] = np.full(len(rows), slots.size, np.int64)
        for i in range(config.num_hidden_layers):
            slots = held[io_spec.attention_kind(config, i)]
            for name, reference in ((io_spec.past_key(i), new.keys[i]), (io_spec.past_value(i), new.values[i])):
                buffer = garbage.copy()
                buffer[:, :, :slots.size] = reference[rows][:, :, slots].numpy()
                inputs[name] = buffer.astype(torch.empty(0, dtype=kv_dtype).numpy().dtype)
        got = dict(zip([o.name for o in graphs[graph].get_outputs()], run(graphs[graph], inputs)))
        assert_close(f"{graph} {begin}..{end} logits", got[io_spec.LOGITS], logits[rows, begin:end], rel)
        for i in range(config.num_hidden_layers):
            filled = held[io_spec.attention_kind(config, i)].size
            for name, reference in ((io_spec.present_key(i), new.keys[i]), (io_spec.present_value(i), new.values[i])):
                assert_close(f"{name} {begin}..{end}", got[name][:, :, filled:filled + end - begin],
                             reference[rows, :, begin:end], rel)


def check_positions_against_pytorch(artifact: Path, model, rel: float, kv_dtype) -> None:
    """Prefill from an empty cache, prefill continuing a cache, and one decode step, each crossing a chunk boundary.

    The reference is the eager model with the unbounded cache (every past token, in order). The graphs get the cache
    the way the runtime lays it out: chunked layers hold only the current chunk plus empty slots (-1) with garbage in
    them, global layers hold every past token in a rotated slot order.
    """
    config = model.config
    chunk = config.attention_chunk_size
    batch, first, second = 2, chunk - 3, 6  # first piece ends just before the boundary, the second crosses it
    total = first + second + 1
    ids = torch.randint(0, config.vocab_size, (batch, total), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(total).expand(batch, total)
    heads, dim = config.num_key_value_heads, config.head_dim
    empty_kv = [torch.zeros(batch, heads, 0, dim, dtype=kv_dtype)] * config.num_hidden_layers
    no_slots = torch.zeros(batch, 0, dtype=torch.int64)
    prefill, decode = session(artifact / "prefill.onnx"), session(artifact / "decode.onnx")

    def runtime_layout(cache: KVCache, upto: int):
        """Cache of positions < upto as the runtime holds it."""
        start = upto // chunk * chunk  # the chunk buffer holds only the current chunk
        junk = torch.randn(batch, heads, 3, dim, generator=torch.Generator().manual_seed(1)).to(kv_dtype)
        chunked_pos = torch.cat([positions[:, start:upto], torch.full((batch, 3), -1)], dim=1)
        order = torch.roll(torch.arange(upto), 5)
        keys, values = [], []
        for i in range(config.num_hidden_layers):
            k, v = cache.keys[i].to(kv_dtype), cache.values[i].to(kv_dtype)
            if config.uses_rope(i):
                keys.append(torch.cat([k[:, :, start:upto], junk], dim=2))
                values.append(torch.cat([v[:, :, start:upto], junk], dim=2))
            else:
                keys.append(k[:, :, order])
                values.append(v[:, :, order])
        return chunked_pos, positions[:, :upto][:, order], keys, values

    with torch.no_grad():
        cache = KVCache.empty(config, batch, model.lm_head.weight.dtype)
        steps = [(prefill, 0, first), (prefill, first, first + second), (decode, first + second, total)]
        for graph, begin, end in steps:
            step_ids, step_pos = ids[:, begin:end], positions[:, begin:end]
            logits, new = model(step_ids, step_pos, cache)
            if begin == 0:
                inputs = feeds(config, step_ids, step_pos, no_slots, no_slots, empty_kv, empty_kv)
            else:
                inputs = feeds(config, step_ids, step_pos, *runtime_layout(cache, begin))
            assert_outputs_close(config, run(graph, inputs), logits, new, rel)
            cache = cache.append(new, step_pos)


# ----------------------------------------------------------------------------------------------------- numerics
def test_scout_tiny_graphs_match_pytorch(tiny_artifact):
    check_against_pytorch(tiny_artifact, from_preset("scout-tiny", seed=0))


def test_positions_layout_graphs_match_pytorch(tmp_path):
    """The graphs TensorRT gets (the positions KV layout), unoptimized so ONNX Runtime can run them. They rebuild
    identically: the manifest says target onnxruntime (nothing is lowered), and the rebuild traced the in-place layout
    ("not reproducible"); the trace is cached, so the rebuild takes about a second."""
    out = tmp_path / "scout-tiny-positions"
    api.export_model(out, model="scout-tiny", layers=4, random_weights=True, target="tensorrt", optimize=False,
                     show_progress=False)
    assert json.loads((out / "manifest.json").read_text())["kv_layout"] == "positions"
    check_against_pytorch(out, from_config(get_preset("scout-tiny", 4), seed=0))
    rebuilt = api.rebuild(out, show_progress=False)
    assert rebuilt.differences == [] and "decode.onnx" in rebuilt.compared
    # A recipe that gives other weights: the CLI printed the first differing file only, and no way to look further.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["source"]["seed"] = 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    differed = CliRunner().invoke(export_app, ["rebuild", str(out)], terminal_width=200)
    lines = differed.stderr.splitlines()
    assert differed.exit_code == 1, differed.output
    assert "rebuild with --out DIR to keep the rebuilt artifact" in lines[-2]
    original = hashlib.sha256((out / "model.data").read_bytes()).hexdigest()
    assert lines[-1].startswith(f"  model.data: sha256 {original[:16]}… in the original")


def test_the_exporters_optimizer_gives_the_graphs_onnxscripts_optimize_ir_does(monkeypatch):
    """The trace's cleanup runs onnxscript's optimize_ir passes without the SlicesSplit rule (a quarter of an export's
    time); on a chunked RoPE layer and a global NoPE layer it must give optimize_ir's graphs, node for node."""
    from onnxscript.optimizer import optimize_ir

    from llama4_export.export import onnx_export

    config, layers = get_preset("scout-tiny"), range(2, 4)
    assert [config.no_rope_layers[k] for k in layers] == [1, 0]
    ours = onnx_export._trace_graphs(config, torch.float32, layers, "positions", None)
    monkeypatch.setattr(onnx_export, "_optimize", optimize_ir)
    reference = onnx_export._trace_graphs(config, torch.float32, layers, "positions", None)
    assert {name: str(graph) for name, graph in ours.items()} == {name: str(graph) for name, graph in reference.items()}
    assert all("MatMul" in str(graph) for graph in ours.values())


def test_scoutlike_graphs_match_pytorch(scoutlike_artifact, scoutlike_dir):
    check_against_pytorch(scoutlike_artifact, load(scoutlike_dir))


def test_prefill_graph_takes_one_token_and_batch_one(tiny_artifact):
    model = from_preset("scout-tiny", seed=0)
    config = model.config
    ids, positions = torch.tensor([[17]]), torch.tensor([[0]])
    prefill = session(tiny_artifact / "prefill.onnx")
    outputs = run(prefill, empty_in_place_feeds(config, ids, positions))
    with torch.no_grad():
        logits, new = model(ids, positions, KVCache.empty(config, 1, torch.float32))
    assert_in_place_close(config, prefill, outputs, logits, new, 1e-4)


# ----------------------------------------------------------------------------------------------------- graph structure
def test_decode_graph_reads_expert_weights_only_through_gather(tiny_artifact):
    graph = onnx.load(str(tiny_artifact / "decode.onnx"), load_external_data=False).graph
    experts = {t.name for t in graph.initializer if ".feed_forward.experts." in t.name}
    config = get_preset("scout-tiny")
    assert len(experts) == 2 * len(config.moe_layers)  # gate_up_proj and down_proj per MoE layer
    consumers = {name: [n.op_type for n in graph.node if name in n.input] for name in experts}
    assert all(consumers.values()), f"unused expert weights: {[n for n, ops in consumers.items() if not ops]}"
    not_gather = {name: ops for name, ops in consumers.items() if set(ops) - {"Gather", "GatherND"}}
    assert not not_gather, f"expert weights consumed by other ops than Gather: {not_gather}"


def test_decode_graph_never_reads_unselected_experts(tiny_artifact, tmp_path):
    """Poison every expert the router does not pick with NaN: decode must not notice, prefill (dense) must."""
    model = from_preset("scout-tiny", seed=0)
    config = model.config
    selected: dict[int, int] = {}
    for i, layer in enumerate(model.model.layers):
        if config.is_moe_layer(i):
            router = layer.feed_forward.router
            router.register_forward_hook(lambda module, args, out, i=i: selected.__setitem__(i, int(out.argmax(-1))))
    ids, positions = torch.tensor([[42]]), torch.tensor([[0]])
    with torch.no_grad():
        logits, new = model(ids, positions, KVCache.empty(config, 1, torch.float32))
    assert len(set(selected.values())) > 1  # different layers pick different experts

    poisoned = tmp_path / "poisoned"
    shutil.copytree(tiny_artifact, poisoned)
    data = np.memmap(poisoned / "model.data", dtype=np.uint8, mode="r+")
    graph = onnx.load(str(poisoned / "decode.onnx"), load_external_data=False).graph
    for tensor in graph.initializer:
        if ".feed_forward.experts." in tensor.name:
            info = {entry.key: int(entry.value) for entry in tensor.external_data if entry.key in ("offset", "length")}
            weights = data[info["offset"]:info["offset"] + info["length"]].view(np.float32).reshape(tensor.dims)
            layer = int(tensor.name.split(".")[2])
            weights[[e for e in range(config.num_local_experts) if e != selected[layer]]] = np.nan
    data.flush()
    del data

    inputs = empty_in_place_feeds(config, ids, positions)
    decode = session(poisoned / "decode.onnx")
    assert_in_place_close(config, decode, run(decode, inputs), logits, new, 1e-4)
    assert np.isnan(run(session(poisoned / "prefill.onnx"), inputs)[0]).all()


def test_both_graphs_share_one_weights_file_storing_each_weight_once(tiny_artifact):
    locations = {}
    for graph_file in GRAPH_FILES:
        graph = onnx.load(str(tiny_artifact / graph_file), load_external_data=False).graph
        for tensor in graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {entry.key: entry.value for entry in tensor.external_data}
                locations.setdefault(tensor.name, set()).add((info["location"], int(info["offset"]), int(info["length"])))
    assert {loc[0] for locs in locations.values() for loc in locs} == {"model.data"}
    shared = [name for name in locations if "self_attn.q_proj" in name or "experts" in name or name == "lm_head.weight"]
    assert shared and all(len(locations[name]) == 1 for name in shared), "a weight points to two places"
    model = from_preset("scout-tiny", seed=0)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    data_bytes = (tiny_artifact / "model.data").stat().st_size
    assert param_bytes * 0.95 <= data_bytes <= param_bytes * 1.05, (data_bytes, param_bytes)


@pytest.mark.parametrize("graph_file", GRAPH_FILES)
def test_onnx_checker_passes(tiny_artifact, graph_file):
    onnx.checker.check_model(str(tiny_artifact / graph_file), full_check=True)


def test_every_graph_of_an_optimized_int4_artifact_is_valid_onnx(tmp_path):
    """What the graph passes write for ONNX Runtime, and the tokenizer graphs: RMSNorm was ORT's
    SimplifiedLayerNormalization, a contrib op ORT registers in the default domain, which onnx.checker refused ("No Op
    registered for SimplifiedLayerNormalization"; the standard RMSNormalization, opset 23, runs on the same ORT
    kernel); the extensions' decode graph had no shapes on its input and output ("Field 'shape' of 'type' is
    required"). The com.microsoft and extensions ops are in their own domains, as ONNX allows."""
    out = tmp_path / "int4"
    api.export_model(out, model="scout-tiny", precision="int4", target="onnxruntime",
                     quant=api.QuantOptions(int4_algo="rtn", report=False), show_progress=False)
    graphs = sorted(name for name in read_manifest(out)["files"] if name.endswith(".onnx"))
    assert graphs == ["decode.onnx", "prefill.onnx", "tokenizer_decode.onnx", "tokenizer_encode.onnx"]
    for graph_file in graphs:
        onnx.checker.check_model(str(out / graph_file), full_check=True)
    for graph_file in GRAPH_FILES:
        graph = onnx.load(str(out / graph_file), load_external_data=False)
        ops = {(node.domain, node.op_type) for node in graph.graph.node}
        assert ("", "RMSNormalization") in ops and ("com.microsoft", "MatMulNBits") in ops, sorted(ops)


def test_a_tied_checkpoint_at_int4_quantizes_its_embedding_and_lm_head_like_an_untied_one(tmp_path):
    """tie_word_embeddings: the one tensor is traced as lm_head.weight, so the embedding's Gather escaped the 4-bit
    GatherBlockQuantized (found by name) and stayed fp32 beside lm_head's 8-bit copy: the artifact was 41 % over what
    `inspect` said here (at Scout's shapes about twice). Now both are quantized as an untied checkpoint's, the size is
    inspect's, and the logits and greedy tokens stay transformers' (within int4's error)."""
    from transformers import Llama4ForCausalLM as HFLlama4

    checkpoint = make_hf_checkpoint(tmp_path / "tied", seed=3, dtype=torch.float32, num_hidden_layers=2,
                                    intermediate_size=64, intermediate_size_mlp=128, tie_word_embeddings=True)
    hf = HFLlama4.from_pretrained(checkpoint, dtype=torch.float32).eval()
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    out = tmp_path / "int4"
    api.export_model(out, checkpoint=checkpoint, precision="int4", quant=api.QuantOptions(int4_algo="rtn", report=False),
                     show_progress=False)
    for graph_file in GRAPH_FILES:
        graph = onnx.load(str(out / graph_file), load_external_data=False).graph
        attributes = {node.op_type: {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                      for node in graph.node if io_spec.INPUT_IDS in node.input or "lm_head.weight.nbits" in node.input}
        assert set(attributes) == {"GatherBlockQuantized", "MatMulNBits"}, (graph_file, sorted(attributes))
        assert attributes["GatherBlockQuantized"]["bits"] == 4 and attributes["MatMulNBits"]["bits"] == 8
    inspected = CliRunner().invoke(export_app, ["inspect", "--checkpoint", str(checkpoint), "--json"])
    assert initializer_bytes(out) == pytest.approx(json.loads(inspected.output)["weight_bytes"]["int4_onnxruntime"], rel=0.02)
    ours = CheckpointWeights(checkpoint).config  # the disk check's figure for the artifact it writes
    spec = api.QuantOptions(block_size=default_block_size(ours)).spec_for("int4", "onnxruntime")
    assert initializer_bytes(out) == pytest.approx(artifact_weight_bytes(ours, "int4", "onnxruntime", spec), rel=0.02)

    config = hf.config
    ids = torch.randint(0, config.vocab_size, (1, config.attention_chunk_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf(ids).logits
        greedy = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    prefill = session(out / "prefill.onnx")
    logits = run(prefill, empty_in_place_feeds(config, ids, torch.arange(ids.shape[1])[None]))[0]
    assert_close("int4 logits", logits, reference, rel=0.2)
    assert (logits.argmax(-1) == reference.argmax(-1).numpy()).mean() >= 0.75
    assert Generator.load(out).generate(ids[0].tolist(), max_new_tokens=8).token_ids == greedy


def test_the_torch_backend_runs_a_tied_checkpoints_unoptimized_artifact(tmp_path):
    """A tied checkpoint's one tensor is traced as lm_head.weight: `--backend torch` on its --no-optimize artifact
    said the graph had no initializer 'model.embed_tokens.weight'. Its tokens are transformers' greedy ones."""
    from transformers import Llama4ForCausalLM as HFLlama4

    checkpoint = make_hf_checkpoint(tmp_path / "tied", seed=4, dtype=torch.float32, num_hidden_layers=2,
                                    tie_word_embeddings=True)
    out = tmp_path / "fp32"
    api.export_model(out, checkpoint=checkpoint, optimize=False, quant=api.QuantOptions(report=False),
                     show_progress=False)
    hf = HFLlama4.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.randint(0, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        greedy = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    assert torch_generator(out).generate(ids[0].tolist(), max_new_tokens=8).token_ids == greedy


def test_graph_interface_follows_io_spec(tiny_artifact):
    config = get_preset("scout-tiny")
    for graph_file in GRAPH_FILES:
        sess = session(tiny_artifact / graph_file)
        new_tokens = 1 if graph_file == "decode.onnx" else None
        assert [i.name for i in sess.get_inputs()] == io_spec.input_names(config, new_tokens=new_tokens, layout="in_place")
        assert [o.name for o in sess.get_outputs()] == io_spec.output_names(config, layout="in_place")
        dims = {i.name: i.shape for i in sess.get_inputs()}
        assert dims[io_spec.PAST_LENGTHS["chunked"]] == dims[io_spec.PAST_LENGTHS["global"]] == ["batch"]
        present = {o.name: o.shape for o in sess.get_outputs()}
        assert present[io_spec.present_key(3)] == dims[io_spec.past_key(3)]  # the buffer comes back whole
        assert dims[io_spec.past_key(0)][0] == "batch" and dims[io_spec.past_key(0)][2] == "chunk_slots"
        assert dims[io_spec.past_key(3)][2] == "global_slots"  # layer 3 is the NoPE layer
        assert dims[io_spec.INPUT_IDS][1] == (1 if graph_file == "decode.onnx" else "new_tokens")


# ----------------------------------------------------------------------------------------------------- reproducibility
def test_re_export_replaces_the_artifact_with_identical_bytes_and_fp16_matches(tmp_path, two_layer_checkpoint):
    """Two exports of the same model, the second over the first: every file comes back byte-identical, and the
    directory is replaced as a whole. fp16 here, so this also covers the fp16 path (checked against the fp32 model)."""
    out = tmp_path / "two-layer-fp16"
    options = dict(checkpoint=two_layer_checkpoint, precision="fp16", optimize=False, show_progress=False)
    api.export_model(out, **options)
    first = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    assert set(first) == {*GRAPH_FILES, "model.data", "manifest.json", "generation_config.json"}  # no tokenizer to copy
    (out / "model.data").unlink()
    (out / "stale.txt").write_text("from an older export")  # a file an older export wrote and listed
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "files": {**manifest["files"], "stale.txt": "0" * 64}}))
    api.export_model(out, **options)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} == first
    check_against_pytorch(out, load(two_layer_checkpoint), rel=1e-2, kv_dtype=torch.float16)


# ----------------------------------------------------------------------------------------------------- artifact
def test_manifest_lists_every_file_with_its_sha256(tiny_artifact):
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    on_disk = {p.name for p in tiny_artifact.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((tiny_artifact / name).read_bytes()).hexdigest() == digest, name
    assert manifest["source"] == {"preset": "scout-tiny", "seed": 0}
    assert manifest["precision"] == "fp32" and manifest["target"] == "onnxruntime"
    assert manifest["graphs"]["decode"]["file"] == "decode.onnx"
    assert manifest["graphs"]["prefill"] == {"file": "prefill.onnx", "moe_impl": "dense", "new_tokens": None, "max_new_tokens": MAX_PREFILL}
    assert manifest["model"] == get_preset("scout-tiny").to_hf_dict()
    assert set(manifest["tools"]) >= {"llama4_export", "torch", "onnx", "onnxruntime"}


def test_checkpoint_manifest_records_file_hashes_and_copies_tokenizer(scoutlike_artifact, scoutlike_dir, monkeypatch):
    manifest = json.loads((scoutlike_artifact / "manifest.json").read_text())
    source = manifest["source"]
    assert source["checkpoint"] == "l4-scoutlike"
    monkeypatch.chdir(scoutlike_dir)  # `--checkpoint .` recorded the name "" (a manifest unlike the absolute path's)
    assert CheckpointWeights(".").manifest_entry() == source
    weights = sorted(p.name for p in scoutlike_dir.glob("*.safetensors"))
    assert set(source["files"]) == {"config.json", "model.safetensors.index.json", *weights}
    assert source["files"]["config.json"] == hashlib.sha256((scoutlike_dir / "config.json").read_bytes()).hexdigest()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert filecmp.cmp(scoutlike_artifact / name, scoutlike_dir / name, shallow=False), name
        assert name in manifest["files"]


TEXTS = ["Hello, world!", "  leading spaces, tabs\tand\nnewlines\r\n", "naïve café — 東京 🌍🚀", ""]


def test_preset_byte_level_tokenizer_round_trips_utf8(tiny_artifact):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_artifact / "tokenizer.json"))
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == list(text.encode("utf-8"))
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("hi").ids == [256, *b"hi"]  # bos from the post-processor


def test_preset_tokenizer_files_work_in_transformers_with_the_chat_template(tiny_artifact):
    from transformers import AutoTokenizer, GenerationConfig

    config = get_preset("scout-tiny")
    tokenizer = AutoTokenizer.from_pretrained(tiny_artifact)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (256, 257, 258)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (256, (257,), 258)
    for token in ("<|header_start|>", "<|header_end|>", "<|end_of_text|>"):
        assert 258 < tokenizer.convert_tokens_to_ids(token) < config.vocab_size
    for text in TEXTS:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ☕"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nHi ☕<|eot|><|header_start|>assistant<|header_end|>\n\n"
    )
    ids = tokenizer(rendered, add_special_tokens=False).input_ids
    assert ids[:2] == [256, 259] and ids[-2:] == [*b"\n\n"] and ids.count(257) == 2
    generation = GenerationConfig.from_pretrained(tiny_artifact)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (256, 257, 258)


# ----------------------------------------------------------------------------------------------------- CLI errors
def _file(tmp: Path) -> Path:
    (tmp / "a-file").write_text("x")
    return tmp / "a-file"


def _foreign_dir(tmp: Path) -> Path:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("keep me")
    return tmp / "mine"


def _web_app(tmp: Path) -> Path:
    """Another program's directory with a manifest.json: was taken for an artifact and replaced whole (deleted)."""
    (tmp / "webapp" / "src").mkdir(parents=True)
    (tmp / "webapp" / "manifest.json").write_text('{"name": "My PWA"}')
    (tmp / "webapp" / "src" / "app.js").write_text("code")
    return tmp / "webapp"


def _artifact_with_notes(tmp: Path) -> Path:
    """An artifact (its manifest lists nothing, as an empty export's would) holding a file of the user's."""
    (tmp / "art").mkdir()
    (tmp / "art" / "manifest.json").write_text('{"format": "llama4-export", "format_version": 1, "files": {}}')
    (tmp / "art" / "NOTES.md").write_text("keep me")
    return tmp / "art"


CLI_ERRORS = {
    "unknown preset": (lambda t: ["--model", "llama-99", "--out", str(t / "o")], "unknown preset"),
    "missing checkpoint": (lambda t: ["--checkpoint", str(t / "nope"), "--out", str(t / "o")], "not found"),
    # the message's brackets are text: rich read "[int4]" as markup and dropped it from the path
    "missing checkpoint, brackets in its path": (lambda t: ["--checkpoint", str(t / "scout[int4]"), "--out", str(t / "o")],
                                                 "scout[int4]: checkpoint directory not found"),
    "unsupported precision": (lambda t: ["--model", "scout-tiny", "--precision", "int3", "--out", str(t / "o")], "precision"),
    "checkpoint not of the preset": (lambda t: ["--model", "scout-tiny", "--checkpoint", str(t), "--out", str(t / "o")], "config.json"),
    "no source": (lambda t: ["--out", str(t / "o")], "--model PRESET or --checkpoint DIR"),
    "no --out": (lambda t: ["--model", "scout-tiny"], "--out"),
    "--out is a file": (lambda t: ["--model", "scout-tiny", "--out", str(_file(t))], "not a directory"),
    "--out holds other files": (lambda t: ["--model", "scout-tiny", "--out", str(_foreign_dir(t))], "not a llama4-export artifact"),
    "--out holds another program's manifest.json": (lambda t: ["--model", "scout-tiny", "--out", str(_web_app(t))],
                                                    "webapp: directory is not empty and is not a llama4-export artifact"),
    "--out is an artifact holding a user's file": (lambda t: ["--model", "scout-tiny", "--out",
                                                              str(_artifact_with_notes(t))],
                                                   "an artifact that also holds 'NOTES.md', not in its manifest.json"),
    "--max-prefill 0": (lambda t: ["--model", "scout-tiny", "--max-prefill", "0", "--out", str(t / "o")], "at least 1"),
    # engine limits refused before the export runs, not after it is written
    "--window 0": (lambda t: ["--model", "scout-tiny", "--target", "tensorrt", "--window", "0", "--out", str(t / "o")],
                   "--window 0: the global KV window needs at least 5 slots"),
    "--max-batch 0": (lambda t: ["--model", "scout-tiny", "--target", "tensorrt", "--max-batch", "0", "--out",
                                 str(t / "o")], "--max-batch 0: must be at least 1"),
    # accepted, and no timing cache could be there for the build after the export: it failed only then
    "--reproducible without --timing-cache": (lambda t: ["--model", "scout-tiny", "--target", "tensorrt",
                                                          "--reproducible", "--out", str(t / "o")],
                                              "--reproducible without --timing-cache: the default cache lies in --out"),
    "--reproducible with a missing cache": (lambda t: ["--model", "scout-tiny", "--target", "tensorrt", "--reproducible",
                                                       "--timing-cache", str(t / "none.cache"), "--out", str(t / "o")],
                                            "none.cache: no timing cache to reproduce from (--reproducible)"),
    # 0 is not "the default"
    "--calib-samples 0": (lambda t: ["--model", "scout-tiny", "--precision", "int4", "--calib-samples", "0", "--out",
                                     str(t / "o")], "--calib-samples 0 /"),
    # printed nothing after the export
    "--passes-report --no-optimize": (lambda t: ["--model", "scout-tiny", "--no-optimize", "--passes-report", "--out",
                                                 str(t / "o")], "--passes-report prints the graph passes' table"),
    # ignored: the stored report was printed
    "passes --report --target": (lambda t: ["passes", str(t), "--report", "--target", "tensorrt"],
                                 "--report prints the stored report and changes nothing; --target applies to optimizing"),
    # the next three were accepted and ignored
    "passes --tolerance without --verify": (lambda t: ["passes", str(t), "--tolerance", "5"],
                                            "--tolerance 5 bounds --verify's check, which is not asked for"),
    "passes --trt-fallback for onnxruntime": (lambda t: ["passes", str(t), "--target", "onnxruntime", "--trt-fallback"],
                                              "--trt-fallback: picks the MoE lowering of --target tensorrt, not onnxruntime"),
    "--trt-fallback for onnxruntime": (lambda t: ["--model", "scout-tiny", "--target", "onnxruntime", "--trt-fallback",
                                                  "--out", str(t / "o")],
                                       "--trt-fallback: picks the MoE lowering of --target tensorrt, which this export"),
}


@pytest.mark.parametrize("case", sorted(CLI_ERRORS))
def test_cli_bad_input_prints_one_line_and_exits_2(tmp_path, case):
    make_args, expected = CLI_ERRORS[case]
    args = make_args(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(export_app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written or removed


def test_an_export_into_a_directory_another_job_is_writing_is_refused(tmp_path):
    """Two exports into one --out both said "wrote" and the last to finish replaced the other's artifact: a job whose
    temp directory beside --out is locked by a live process (as held_directory locks it) makes the next one refuse."""
    busy = tmp_path / ".model.tmp-other"
    busy.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY);"
                               " fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)", str(busy)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(export_app, ["--model", "scout-tiny", "--no-optimize", "--no-report",
                                                 "--out", str(tmp_path / "model")])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2 and result.output.strip() == (
        f"error: {tmp_path / 'model'}: another llama4-export job is writing it (.model.tmp-other is locked); wait for it "
        "to finish or choose another directory"), result.output
    assert not (tmp_path / "model").exists() and busy.is_dir()


@pytest.mark.parametrize("make, expected", [
    (lambda: api.export_model("o", model="scout-tiny", partitions="2"), "export_model(partitions='2'): expected an integer"),
    (lambda: api.export_model("o", model="scout-tiny", seed=1.5), "export_model(seed=1.5): expected an integer, not float"),
    (lambda: api.export_model("o", model="scout-tiny", quant="awq"), "export_model(quant='awq'): expected api.QuantOptions"),
    (lambda: api.export_model("o", model="scout-tiny", engines="x"), "export_model(engines='x'): expected api.EngineOptions"),
    (lambda: api.export_model("o", model="scout-tiny", random_weights="yes"), "expected True or False, not str"),
    (lambda: api.export_model("o", model="scout-tiny", checkpoint=5), "export_model(checkpoint=5): expected a directory"),
    (lambda: api.QuantOptions(calib_samples="8"), "QuantOptions(calib_samples='8'): expected an integer or None"),
    (lambda: api.EngineOptions(max_batch="2"), "EngineOptions(max_batch='2'): expected an integer, not str"),
    (lambda: Generator.load(".", window="4096"), "Generator.load(window='4096'): expected an integer or None"),
    (lambda: Generator.load(".", window=2.5), "Generator.load(window=2.5): expected an integer or None, not float"),
    (lambda: Generator.load(".", sinks="4"), "Generator.load(sinks='4'): expected an integer, not str"),
    (lambda: BatchOptions(prefill_budget=2.5), "EngineOptions(prefill_budget=2.5): expected an integer or None"),
    (lambda: BatchOptions(max_batch="8"), "EngineOptions(max_batch='8'): expected an integer, not str"),
], ids=["partitions", "seed", "quant", "engines", "flag", "checkpoint", "quant-field", "engine-field", "load-window",
        "load-window-float", "load-sinks", "batch-budget", "batch-rows"])
def test_python_api_arguments_of_a_wrong_type_raise_one_error_line(tmp_path, monkeypatch, make, expected):
    """Not a TypeError from a comparison, an AttributeError or torch's RuntimeError from somewhere inside (nor a
    window of "4096" or 2.5 taken as 4096 or 2): the API owns validation, so it names the argument before anything
    is read or written."""
    from llama4_export.errors import Llama4ExportError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(Llama4ExportError) as info:
        make()
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_str_paths_in_the_options_are_paths():
    assert api.QuantOptions(calib_data="corpus.txt").calib_data == Path("corpus.txt")
    assert api.EngineOptions(timing_cache="t.cache").timing_cache == Path("t.cache")


def test_an_unchanged_artifact_is_hashed_once_and_a_changed_file_is_still_caught(tmp_path, monkeypatch):
    """Loads remember verified files by path and stat: the second load hashes nothing; rewriting a file (same size,
    mtime set back) changes its ctime, so it is hashed again and refused."""
    import os
    import time

    from llama4_export import artifact
    from llama4_export.runtime import Generator

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "tiny"
    api.export_model(out, model="scout-tiny", layers=2, random_weights=True, target="onnxruntime", show_progress=False)
    time.sleep(artifact._VerifiedFiles.RACY_S)  # files changed just now are not remembered (racy)
    hashed = []
    monkeypatch.setattr(artifact, "sha256_file", lambda path: hashed.append(path.name) or hashlib.sha256(
        path.read_bytes()).hexdigest())
    first = Generator.load(out).generate([1, 2, 3], max_new_tokens=4).token_ids
    listed = json.loads((out / "manifest.json").read_text())["files"]
    assert sorted(hashed) == sorted(listed)
    hashed.clear()
    assert Generator.load(out).generate([1, 2, 3], max_new_tokens=4).token_ids == first and hashed == []

    data = out / "model.data"
    stat = data.stat()
    with open(data, "r+b") as f:  # one byte flipped in place: same size, and the mtime is set back below
        f.seek(stat.st_size // 2)
        byte = f.read(1)
        f.seek(stat.st_size // 2)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(artifact.ArtifactError, match="model.data: sha256 does not match"):
        Generator.load(out)
    assert hashed == ["model.data"]


@pytest.mark.parametrize("stop, ignored", [("SIGTERM", None), ("SIGINT", None), ("SIGHUP", None),
                                           ("SIGTERM", "SIGHUP"), ("SIGTERM", "SIGINT")])
def test_a_stop_signal_mid_export_removes_its_temp_directories(tmp_path, stop, ignored):
    """A cancelled CI job or `kill` sends SIGTERM, Ctrl-C SIGINT, a closed terminal SIGHUP: the export exits 128 + the
    signal, and neither its work directory nor its half-written artifact is left beside --out (at Scout's size they
    hold hundreds of GB; SIGHUP killed it without a word and left them). A signal the export was started ignoring
    (`nohup`'s SIGHUP, a script's background job's SIGINT) stays ignored: the SIGTERM after it is what stops it."""
    import signal
    import sys
    import time

    parent = tmp_path / "exports"
    parent.mkdir()
    command = [sys.executable, "-c", "from llama4_export.cli.export import main; main()", "--model", "scout-tiny",
               "--precision", "int4", "--out", str(parent / "o")]
    ignore = (lambda: signal.signal(signal.Signals[ignored], signal.SIG_IGN)) if ignored else None
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=ignore)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".o.tmp-") for p in parent.iterdir()):  # the export is writing
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
        time.sleep(0.02)
    signum = signal.Signals[stop]
    if ignored:
        process.send_signal(signal.Signals[ignored])
        time.sleep(0.5)  # time to act on it, were it not ignored
    process.send_signal(signum)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert f"stopped by {stop}: this job's temp files were removed" in stderr.splitlines()[-1]
    assert sorted(p.name for p in parent.iterdir()) == []


def test_a_stop_signal_on_a_terminal_leaves_its_line_last_and_the_cursor_shown(tmp_path):
    """On a terminal the steps' progress display stands in for sys.stderr: the stop line went above the spinner, which
    was redrawn after it (the shell's prompt then landed on the spinner's line), or was never printed when the stop
    came before the display's first refresh, and the escape showing the cursor again was dropped, leaving the
    terminal without one."""
    import os
    import pty
    import signal
    import sys

    pid, terminal = pty.fork()
    if pid == 0:  # the export, on the terminal pty.fork made
        try:
            os.execv(sys.executable, [sys.executable, "-c", "from llama4_export.cli.export import main; main()",
                                      "--model", "scout-tiny", "--no-report", "--out", str(tmp_path / "o")])
        finally:
            os._exit(127)  # never this test's process going on twice
    shown, signalled = b"", False
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # EIO: the export has ended
            break
        if not chunk:
            break
        shown += chunk
        if not signalled and b"\x1b[?25l" in shown:  # the progress display is up (it hid the cursor)
            os.killpg(pid, signal.SIGINT)  # Ctrl-C: the terminal's whole process group
            signalled = True
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 130, shown[-2000:]
    assert shown.endswith(b"\x1b[?25h\r\nstopped by SIGINT: this job's temp files were removed\r\n"), shown[-2000:]
    assert list(tmp_path.iterdir()) == []


_STOPPED_CHILD = """
import os, signal, sys
from pathlib import Path
from llama4_export import artifact

artifact.exit_on_signals(signal.SIGTERM)
parent = Path(sys.argv[1])
with artifact.held_directory(parent, ".o.work-") as work:
    (work / "half-written").write_bytes(b"x" * 100)
    if sys.argv[2] == "in a finalizer":
        class Finalized:
            def __del__(self):  # exceptions raised here are discarded, as C++ callers (torch's) discard or convert them
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(1000))  # bytecodes for the handler to run between
        Finalized()
    else:
        with artifact.uninterrupted():
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))
            (parent / "the block ran to its end").touch()
    (parent / "went on after the signal").touch()
"""


_STOPPED_WHILE_THE_OLD_ONE_GOES = """
import os, shutil, signal, sys
from pathlib import Path
from llama4_export import artifact

artifact.exit_on_signals(signal.SIGTERM)
remove = shutil.rmtree
def stopped_midway(path, *args, **kwargs):  # a stop while the replaced artifact (hundreds of GB) is being removed
    if ".old-" in str(path) and shutil.rmtree is stopped_midway:
        shutil.rmtree = remove  # once: the handler removes it too
        os.kill(os.getpid(), signal.SIGTERM)
    remove(path, *args, **kwargs)
shutil.rmtree = stopped_midway
target = Path(sys.argv[1])
with artifact.atomic_directory(target) as tmp:
    (tmp / "new.txt").write_text("new")
"""


def test_a_stop_while_the_replaced_artifact_is_removed_leaves_the_new_one_readable(tmp_path):
    """The new artifact is in place once swapped; a stop while the previous one was being removed left it as mkdtemp
    made it, 0700: unreadable to the other users (a server's account) that read the one it replaced."""
    import sys

    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "old.txt").write_text("old")
    done = subprocess.run([sys.executable, "-c", _STOPPED_WHILE_THE_OLD_ONE_GOES, str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"] and (tmp_path / "o" / "new.txt").read_text() == "new"
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("where", ["in a finalizer", "in an uninterrupted block"])
def test_a_stop_signal_ends_the_process_wherever_it_lands(tmp_path, where):
    """The handler does not raise into the code it interrupts: an exception landing in Python code that C++ called
    (torch's tracing) became a RuntimeError there (exit 1, seen in CI) or std::terminate (SIGABRT, nothing removed), and
    in a finalizer it is dropped and the job goes on. It removes the scratch and exits 143 at once; inside
    `uninterrupted()` (an artifact's swap into place) at the block's end."""
    import sys

    done = subprocess.run([sys.executable, "-c", _STOPPED_CHILD, str(tmp_path), where], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 143, done.stderr[-2000:]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == (["the block ran to its end"] if where == "in an uninterrupted block" else []), left


def test_scratch_a_killed_export_left_is_removed_by_the_next_export_and_a_running_ones_is_kept(tmp_path):
    """SIGKILL (the OOM killer, a CI runner torn down) runs no cleanup: the work directory, the half-written artifact
    and the passes' spill stay beside --out, hidden, at Scout's size hundreds of GB that the next export's disk check
    would count against it. The next export to that --out removes them, and only them: a running export's scratch
    and another artifact's are kept."""
    import signal
    import sys
    import time

    from llama4_export import artifact

    parent = tmp_path / "exports"
    parent.mkdir()
    (parent / ".other.tmp-abc").mkdir()  # another --out's, not this export's to judge
    command = [sys.executable, "-c", "from llama4_export.cli.export import main; main()", "--model", "scout-tiny",
               "--layers", "2", "--random-weights", "--out", str(parent / "o")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    scratch = (".o.tmp-", ".o.work-", ".spill-")
    deadline = time.monotonic() + 120
    while not all(any(p.name.startswith(kind) for p in parent.iterdir()) for kind in scratch):  # optimizing
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
        time.sleep(0.02)
    assert artifact.remove_abandoned(parent, artifact.scratch_patterns(parent / "o")) is None  # it is running
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    left = sorted(p.name for p in parent.iterdir() if p.name.startswith(scratch))
    assert len(left) == 3, left

    result = CliRunner().invoke(export_app, ["--model", "scout-tiny", "--layers", "2", "--random-weights", "--target",
                                             "onnxruntime", "--out", str(parent / "o")])
    assert result.exit_code == 0, result.output
    assert f"removed {', '.join(left)} (" in " ".join(result.output.split())
    assert sorted(p.name for p in parent.iterdir()) == [".other.tmp-abc", "o"]
    assert Generator.load(parent / "o").generate([1, 2, 3], max_new_tokens=2).token_ids


def test_an_artifact_directory_given_as_a_symlink_is_replaced_where_it_points(tmp_path):
    """`passes LINK` / `--out LINK` replaced the link by a plain directory, left the directory it pointed to as it was
    and a `.LINK.old-PID` link beside them."""
    (tmp_path / "disk" / "model").mkdir(parents=True)
    (tmp_path / "disk" / "model" / "old.txt").write_text("old")
    (tmp_path / "link").symlink_to(tmp_path / "disk" / "model")
    with atomic_directory(tmp_path / "link") as tmp:
        (tmp / "new.txt").write_text("new")
    assert (tmp_path / "link").is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["disk", "link"]
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["model"]
    assert sorted(p.name for p in (tmp_path / "link").iterdir()) == ["new.txt"]


@pytest.mark.parametrize("out", [".", ".."])
def test_out_that_is_or_holds_the_current_directory_is_refused_in_one_line(tmp_path, monkeypatch, out):
    """`--out .` died in a ValueError ('PosixPath('.') has an empty name') and left `..tmp-*` behind; replacing the
    current directory would leave the shell in a deleted one."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    result = CliRunner().invoke(export_app, ["--model", "scout-tiny", "--out", out])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "is the current directory" in result.output and "give a path below it" in result.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["here"]


def test_a_corrupt_tokenizer_file_is_refused_before_the_export(tmp_path, two_layer_checkpoint):
    """Every file the export copies is checked on the way in: a damaged tokenizer.json would otherwise export with exit
    0 and fail only later, in llama4-run."""
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(two_layer_checkpoint, checkpoint)
    (checkpoint / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')  # truncated
    result = CliRunner().invoke(export_app, ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "tokenizer.json: not a valid tokenizer.json" in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("eos", [[2, "x"], "2", [2, 8.0]])
def test_a_generation_config_whose_eos_ids_are_not_integers_is_refused_before_the_export(tmp_path, two_layer_checkpoint,
                                                                                        eos):
    """Exported with exit 0: llama4-run then failed with a ValueError traceback at "x" (and took "2" and 8.0, which
    llama4-cpp refuses as not integers)."""
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(two_layer_checkpoint, checkpoint)
    (checkpoint / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": eos}))
    result = CliRunner().invoke(export_app, ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert (f"generation_config.json: eos_token_id={json.dumps(eos)}: must be a token id or a list of token ids"
            in " ".join(result.output.split()))
    assert not (tmp_path / "o").exists()

def test_a_head_dim_onnx_runtime_cannot_run_is_refused_before_the_export(tmp_path):
    """transformers takes head_dim 12; ONNX Runtime's GroupQueryAttention refuses it at the first token. The export
    ran to its end (or to a traceback in its accuracy report) and every llama4-run failed with ORT's traceback."""
    checkpoint = make_hf_checkpoint(tmp_path / "ckpt", num_hidden_layers=1, head_dim=12)
    result = CliRunner().invoke(export_app, ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "config.json: head_dim 12 is not a multiple of 8, which ONNX Runtime's GroupQueryAttention" in \
        " ".join(result.output.split())
    assert not (tmp_path / "o").exists()


@pytest.fixture
def small_disk(tmp_path, request):
    """A 5 MB tmpfs (parametrize indirectly for another size)."""
    size = getattr(request, "param", "5m")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'}); CI runs as root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("small_disk", ["1600k"], indirect=True)
def test_a_disk_filling_up_during_the_passes_leaves_nothing_behind(small_disk, monkeypatch):
    """The free-space check up front is disabled so the export really runs into ENOSPC, in the graph-pass stage (the
    weights of scout-tiny's first 2 layers, 1.1 MB, fit once on the 1.6 MB disk, not twice): one line, exit 2, and
    neither the pre-pass artifact (manifest included) nor any temp directory stays."""
    from llama4_export import pipeline

    monkeypatch.setattr(pipeline, "check_disk_space", lambda out, need: None)
    result = CliRunner().invoke(export_app, ["--model", "scout-tiny", "--layers", "2", "--random-weights", "--target",
                                             "onnxruntime", "--no-report", "--out", str(small_disk / "o")])
    assert result.exit_code == 2, result.output
    line = " ".join(result.output.split())
    assert "the disk filled up" in line and "nothing was left behind" in line
    assert list(small_disk.iterdir()) == []


def test_a_file_past_the_file_size_limit_is_one_line_and_leaves_nothing(tmp_path):
    """Only ENOSPC was caught: a file system's (or ulimit's) file size limit stopped model.data's write with a
    traceback. Now one line naming --out, exit 2, and no temp directory stays."""
    out = tmp_path / "o"
    done = run_with_file_size_limit(100_000, "--model", "scout-tiny", "--layers", "1", "--random-weights",
                                    "--no-report", "--out", str(out))
    lines = [line for line in done.stderr.splitlines() if line.startswith(("error", "Traceback"))]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert f"error: {out}: a file outgrew the largest the file system or `ulimit -f` allows" in lines[0]
    assert "nothing was left behind" in " ".join(done.stderr.split())
    assert list(tmp_path.iterdir()) == []


def test_a_rebuild_past_the_file_size_limit_is_one_line_naming_its_temp_directory(tmp_path, monkeypatch):
    """`rebuild` let a refused write (here EFBIG) out as a traceback; now one line naming where it was writing (the
    temp directory without --out), exit 2, and its scratch is gone."""
    original = tmp_path / "a"
    api.export_model(original, model="scout-tiny", layers=1, random_weights=True, quant=api.QuantOptions(report=False),
                     show_progress=False)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    done = run_with_file_size_limit(100_000, "rebuild", str(original))
    lines = [line for line in done.stderr.splitlines() if line.startswith(("error", "Traceback"))]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert f"error: {temp}: a file outgrew the largest the file system or `ulimit -f` allows" in lines[0]
    assert "nothing was left behind" in " ".join(done.stderr.split())
    assert [path.name for path in temp.iterdir() if "llama4" in path.name] == []  # the scratch (others write here too)


def test_an_out_whose_directory_is_removed_mid_export_is_one_line(tmp_path, monkeypatch):
    """The parent of --out removed while the export ran (a cleanup job, a second terminal) ended in a
    FileNotFoundError traceback naming a temp file; now one line naming the directory, exit 2."""
    from llama4_export import pipeline

    parent = tmp_path / "exports"
    parent.mkdir()
    started = pipeline.ExportResult  # made once the export's temp directories are, before anything is written

    def removing_the_directory(*args, **kwargs):
        shutil.rmtree(parent)
        return started(*args, **kwargs)
    monkeypatch.setattr(pipeline, "ExportResult", removing_the_directory)
    assert _export_to(parent / "o") == [f"error: {parent}: the directory was removed while o was being written in it; "
                                        "nothing was left behind: recreate it and run again"]
    assert list(tmp_path.iterdir()) == []


def _export_to(out) -> list[str]:
    result = CliRunner().invoke(export_app, ["--model", "scout-tiny", "--layers", "1", "--random-weights", "--no-report",
                                             "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    return [" ".join(result.output.split())]


def test_an_out_that_cannot_hold_the_artifact_is_refused_before_the_export(small_disk, tmp_path):
    """A mount point (an empty container volume) ran the whole export and then failed renaming it into place (EBUSY
    traceback); a read-only file system and a file on the way were tracebacks too."""
    assert _export_to(small_disk) == [f"error: {small_disk}: is a mount point, and an artifact directory is renamed into "
                                      f"place as a whole; give a path inside it, e.g. {small_disk / 'model'}"]
    (tmp_path / "afile").write_text("x")
    assert _export_to(tmp_path / "afile" / "sub") == [
        f"error: {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, not a directory; choose another path"]
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        assert _export_to(small_disk / "model") == [
            f"error: {small_disk}: cannot create a directory there (Read-only file system); choose a writable location"]
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert list(small_disk.iterdir()) == []


def test_a_seed_with_a_checkpoint_is_refused(tmp_path, two_layer_checkpoint):
    """--seed 5 --checkpoint exported bytes identical to seed 0: the seed draws a preset's random weights only."""
    result = CliRunner().invoke(export_app, ["--checkpoint", str(two_layer_checkpoint), "--seed", "5", "--out",
                                             str(tmp_path / "o")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and lines == [
        "error: --seed 5 seeds a preset's random weights; a --checkpoint has its own: drop --seed"], result.output
    assert not (tmp_path / "o").exists()


def test_the_cli_prints_paths_holding_brackets_as_they_are(tmp_path, two_layer_checkpoint):
    """rich read "[bf16]" and "[int4]" in paths as markup: the steps said "weights from checkpoint …/ckpt" and the
    last line "wrote …/scout: …". The checkpoint has no tokenizer.json: that exported without a word, and the
    artifact was found to take token ids only when `llama4-run --prompt` refused it; a note on stderr says so."""
    checkpoint, out = tmp_path / "ckpt[bf16]", tmp_path / "scout[int4]"
    shutil.copytree(two_layer_checkpoint, checkpoint)
    result = CliRunner().invoke(export_app, ["--checkpoint", str(checkpoint), "--no-optimize", "--out", str(out)])
    # rich wraps long lines anywhere: compare without whitespace (the paths have none)
    printed = "".join(result.output.split())
    assert result.exit_code == 0 and f"wrote{out}:" in printed, result.output
    assert f"writegraphswithweightsfromcheckpoint{checkpoint}" in printed, result.output
    assert f"note: {checkpoint}: no tokenizer.json, so the artifact will have no tokenizer and take token ids only " \
        "(llama4-run --ids); put the model's tokenizer.json in the checkpoint for one that takes text" in \
        result.stderr.splitlines(), result.stderr
    assert not (out / "tokenizer.json").exists() and "tokenizer.json" not in read_manifest(out)["tokenizer"]["files"]


def test_an_edited_in_memory_model_exports_with_its_checkpoint_tokenizer(tmp_path, scoutlike_dir):
    """README's Python API path: load, edit in memory, export with the checkpoint's tokenizer files; the artifact
    generates what the edited PyTorch model generates. Without a tokenizer source (this checkpoint's special ids do
    not fit a byte-level one) one line says how to give one, and nothing is left behind."""
    from tokenizers import Tokenizer

    from llama4_export.errors import ConfigError
    from llama4_export.evaluation.torch_backend import TorchBackend
    from llama4_export.pipeline import export
    from llama4_export.runtime import Generator
    from llama4_export.weights import ModelWeights

    model = load(scoutlike_dir)
    ids = Tokenizer.from_file(str(scoutlike_dir / "tokenizer.json")).encode("The old man walked to the").ids
    before = Generator(TorchBackend(model), window=64).generate(ids, max_new_tokens=12, stop_tokens=[]).token_ids
    with torch.no_grad():
        model.lm_head.weight[before[0]] *= -1  # the edit: the greedy first token's logit changes sign
    edited = Generator(TorchBackend(model), window=64).generate(ids, max_new_tokens=12, stop_tokens=[]).token_ids
    assert edited != before
    with pytest.raises(ConfigError, match=r"ModelWeights\(model, checkpoint=DIR\)"):
        export(tmp_path / "no-tokenizer", ModelWeights(model), show_progress=False)
    assert list(tmp_path.iterdir()) == []
    export(tmp_path / "edited", ModelWeights(model, checkpoint=scoutlike_dir), show_progress=False)
    assert filecmp.cmp(tmp_path / "edited" / "tokenizer.json", scoutlike_dir / "tokenizer.json", shallow=False)
    artifact = Generator.load(tmp_path / "edited", window=64)
    assert artifact.encode("The old man walked to the") == ids
    assert artifact.generate(ids, max_new_tokens=12, stop_tokens=[]).token_ids == edited
