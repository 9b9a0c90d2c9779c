"""Weight sources and streaming: a streamed export (weights read layer by layer from the source) is byte-identical to
an in-memory one; random weights drawn tensor by tensor are from_preset's; layer-wise statistics equal a whole-model
run's; the passes leave weights on disk; one-line errors for checkpoints that do not fit the preset or the disk."""

from __future__ import annotations

import dataclasses
import filecmp
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
import torch
from typer.testing import CliRunner

from llama4_export import api, pipeline
from llama4_export.artifact import read_manifest
from llama4_export.model.summary import weight_bytes
from llama4_export.calib.calibrate import calibration_samples, tokenizer_for
from llama4_export.calib.layerwise import layerwise_statistics
from llama4_export.calib.stats import Accumulator, kv_cache_amax
from llama4_export.cli.export import export_app
from llama4_export.errors import CheckpointError, ConfigError
from llama4_export.export.writer import SPILL_MIN_ELEMENTS, SourceTensor, SpillFile, load_lazily, _stored_bytes
from llama4_export.graph_passes.pipeline import optimize
from llama4_export.graph_passes.quantize import QuantSpec
from llama4_export.model import get_preset, io_spec
from llama4_export.model.modeling import MLP, MoE
from llama4_export.model.save import save_checkpoint
from llama4_export.model.summary import parameter_counts
from llama4_export.runtime import Generator
from llama4_export.weights import CheckpointWeights, RandomWeights, from_preset, load, materialize, source as source_module

from .conftest import initializer_bytes, make_hf_checkpoint


def _different_files(a: Path, b: Path, ignore=("manifest.json", "report.json")) -> list[str]:
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    return [n for n in names if n not in ignore and
            not ((a / n).is_file() and (b / n).is_file() and filecmp.cmp(a / n, b / n, shallow=False))]


def _run(*args: str):
    result = CliRunner().invoke(export_app, list(args))
    assert result.exit_code == 0, result.output
    return result


# ------------------------------------------------------------------------------------------------ random weights
def test_random_weights_streamed_in_slices_are_from_presets_weights(monkeypatch):
    """One random-weight scheme: drawing tensor by tensor, in any order and in small slices, gives from_preset's
    weights bit for bit."""
    reference = dict(from_preset("scout-tiny", seed=7).named_parameters())
    monkeypatch.setattr(source_module, "CHUNK_BYTES", 4096)  # many slices per tensor
    source = RandomWeights("scout-tiny", seed=7)
    names = sorted(reference)
    for name in [*reversed(names), *names[::3]]:  # out of order, then again
        assert torch.equal(source.tensor(name), reference[name]), name
    assert len(source_module.slices(source.shapes["lm_head.weight"])) > 1


def test_random_weights_at_full_scout_shapes_come_in_bounded_slices():
    """Scout's lm_head (the first tensor drawn, 4 GB in fp32) is drawn slice by slice: the first slice alone costs one
    slice; an expert tensor's slices split its rows (a Scout expert row is 5120 × 16384)."""
    pieces = RandomWeights("scout", seed=1, layers=1).chunks("lm_head.weight", torch.float32)
    first = next(pieces)
    assert first.shape[1] == 5120 and first.numel() * 4 <= source_module.CHUNK_BYTES
    assert abs(float(first.std()) - 0.02) < 1e-3
    assert torch.equal(first, next(RandomWeights("scout", seed=1, layers=1).chunks("lm_head.weight", torch.float32)))
    assert not torch.equal(first, next(RandomWeights("scout", seed=2, layers=1).chunks("lm_head.weight", torch.float32)))
    expert = RandomWeights("scout", layers=1).shapes["model.layers.0.feed_forward.experts.gate_up_proj"]
    index = source_module.slices(expert)[0]
    assert source_module.slice_shape(index, expert)[2:] == (16384,)
    assert int(np.prod(source_module.slice_shape(index, expert))) * 4 <= source_module.CHUNK_BYTES


def test_random_weights_layers_cut_the_preset():
    with pytest.raises(ConfigError, match="--layers 9: preset scout-tiny has 8 layers"):
        RandomWeights("scout-tiny", layers=9)


# ------------------------------------------------------------------------------------------------ stream == in memory
def test_streamed_preset_export_is_the_in_memory_one(tmp_path):
    _run("--model", "scout-tiny", "--layers", "2", "--random-weights", "--target", "onnxruntime", "--no-report",
         "--out", str(tmp_path / "memory"))
    _run("--model", "scout-tiny", "--layers", "2", "--random-weights", "--stream", "--target", "onnxruntime",
         "--no-report", "--out", str(tmp_path / "streamed"))
    assert _different_files(tmp_path / "memory", tmp_path / "streamed") == []


def test_streamed_int4_awq_and_fp8_kv_cache_exports_are_the_in_memory_ones(tmp_path):
    """A bf16 checkpoint with a dense and an MoE layer: int4 AWQ (layer-wise statistics, per-layer plans replayed as the
    weights are written) with an FP8 KV cache, streamed or loaded first: the same graphs and weights."""
    # vocabulary and special ids that leave room for the byte-level tokenizer (the checkpoint has no tokenizer.json)
    checkpoint = make_hf_checkpoint(tmp_path / "ckpt", seed=5, num_hidden_layers=2, interleave_moe_layer_step=2,
                                    vocab_size=320, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    common = ["--checkpoint", str(checkpoint), "--precision", "int4", "--block-size", "32", "--calib-samples", "2",
              "--calib-seq-len", "16", "--kv-cache-dtype", "fp8", "--target", "onnxruntime"]
    _run(*common, "--calib-cache", str(tmp_path / "calib.safetensors"), "--out", str(tmp_path / "memory"))
    _run(*common, "--stream", "--calib-cache", str(tmp_path / "calib2.safetensors"), "--out", str(tmp_path / "streamed"))
    assert _different_files(tmp_path / "memory", tmp_path / "streamed") == []
    memory, streamed = read_manifest(tmp_path / "memory"), read_manifest(tmp_path / "streamed")
    assert memory["quantization"]["awq"] == streamed["quantization"]["awq"] and memory["quantization"]["awq"]
    assert (tmp_path / "calib.awq32").is_dir() and not list(tmp_path.glob(".*"))  # plans cached, no scratch left


# ------------------------------------------------------------------------------------------------ layer-wise statistics
def _whole_model_statistics(model, samples: np.ndarray) -> dict[str, np.ndarray]:
    """The reference: every site collected by hooks while the whole model runs each sample through its own forward."""
    acc = Accumulator()

    def hook(site):
        return lambda m, a: acc.add(site, a[0])

    def kv_hook(i):
        def record(module, args, out):  # returns None: the output stays the module's own
            acc.add(f"layers.{i}.new_key", out[1])
            acc.add(f"layers.{i}.new_value", out[2])
        return record

    hooks = [model.lm_head.register_forward_pre_hook(hook("final_in"))]
    for i, layer in enumerate(model.model.layers):
        attn, ff = layer.self_attn, layer.feed_forward
        mlp = ff.shared_expert if isinstance(ff, MoE) else ff
        assert isinstance(mlp, MLP)
        hooks += [attn.q_proj.register_forward_pre_hook(hook(f"layers.{i}.attn_in")),
                  attn.o_proj.register_forward_pre_hook(hook(f"layers.{i}.o_in")),
                  ff.register_forward_pre_hook(hook(f"layers.{i}.mlp_in")),
                  mlp.down_proj.register_forward_pre_hook(hook(f"layers.{i}.down_in")),
                  attn.register_forward_hook(kv_hook(i))]
    with torch.no_grad():
        for row in samples:
            model(torch.from_numpy(row[None]))
    for h in hooks:
        h.remove()
    return acc.result()


def test_layerwise_statistics_equal_a_whole_model_run(scoutlike_dir):
    """Layer by layer, routed experts expert-major from the checkpoint: the same statistics, bit for bit, as hooks on
    the whole model running each sample (routed-expert sites: checked against the router + experts directly)."""
    samples = np.random.default_rng(0).integers(0, 1000, (2, 32))
    layerwise = layerwise_statistics(CheckpointWeights(scoutlike_dir), samples)
    model = load(scoutlike_dir)
    reference = _whole_model_statistics(model, samples)
    assert [k for k in reference if not np.array_equal(np.asarray(layerwise[k]), reference[k])] == []
    # routed expert 1 of layer 2: x·score over the tokens routed to it, through its own weights
    ff = model.model.layers[2].feed_forward
    acc = Accumulator()
    with torch.no_grad():
        for row in samples:
            captured = {}
            handle = ff.register_forward_pre_hook(lambda m, a: captured.update(x=a[0].reshape(-1, a[0].shape[-1])))
            model(torch.from_numpy(row[None]))
            handle.remove()
            index, score = ff.route(captured["x"])
            rows = (captured["x"] * score[:, None])[index == 1]
            acc.add("x", rows, slot=0, slots=1)
    expected = acc.result()
    assert np.array_equal(np.asarray(layerwise["layers.2.expert_in.gram"][1]), expected["x.gram"][0])
    assert np.array_equal(layerwise["layers.2.expert_in.amax"][1], expected["x.amax"][0])
    fp8 = layerwise_statistics(CheckpointWeights(scoutlike_dir), samples, for_awq=False)
    assert [k for k in fp8 if k.endswith(".gram") or ".expert_" in k] == []
    assert [k for k in fp8 if not np.array_equal(fp8[k], reference[k])] == []


def test_fp8_kv_cache_scales_come_from_layerwise_calibration(tmp_path):
    """--random-weights --precision fp8 --kv-cache-dtype fp8: the cache inputs are float8 and each layer's K/V scale is
    the max |new_key| / |new_value| of the whole PyTorch model (hooks on its forward) / 448."""
    out = tmp_path / "fp8kv"
    _run("--model", "scout-tiny", "--random-weights", "--layers", "2", "--precision", "fp8", "--kv-cache-dtype", "fp8",
         "--calib-samples", "2", "--calib-seq-len", "16", "--calib-cache", str(tmp_path / "c.safetensors"),
         "--target", "onnxruntime", "--no-report", "--out", str(out))
    source = RandomWeights("scout-tiny", layers=2)
    samples, _ = calibration_samples(source, source.config, tokenizer_for(source, source.config), None, 2, 16)
    expected = kv_cache_amax(_whole_model_statistics(materialize(source), samples), 2)
    decode = ir.load(out / "decode.onnx")
    inputs = {v.name: v for v in decode.graph.inputs}
    for layer, (key_amax, value_amax) in expected.items():
        assert inputs[io_spec.past_key(layer)].dtype == ir.DataType.FLOAT8E4M3FN
        scales = decode.graph.initializers
        assert scales[f"kv_cache.{layer}.key_scale"].const_value.numpy() == np.float32(key_amax / 448)
        assert scales[f"kv_cache.{layer}.value_scale"].const_value.numpy() == np.float32(value_amax / 448)
    assert len(Generator.load(out).generate("hello", max_new_tokens=4).token_ids) == 4


# ------------------------------------------------------------------------------------------------ passes on disk
@pytest.fixture(scope="module")
def traced_scoutlike(tmp_path_factory, scoutlike_dir) -> Path:
    """l4-scoutlike's traced graphs as a quantized export writes them: routed experts deferred to the source."""
    from llama4_export.export.onnx_export import trace_graphs
    from llama4_export.export.writer import weight_content, write_graphs

    out = tmp_path_factory.mktemp("traced")
    source = CheckpointWeights(scoutlike_dir)
    write_graphs(trace_graphs(source.config, torch.float32), out, weight_content(source, defer_experts=True))
    return out


def test_passes_leave_weights_on_disk_and_drop_expert_readers(traced_scoutlike, scoutlike_dir, tmp_path):
    """After the passes (quantization + the ONNX Runtime MoE re-layout), no large tensor sits in memory, no weight file
    stays mapped, and the checkpoint experts (read one at a time) hold no reader — every layer's would stay in memory."""
    source = CheckpointWeights(scoutlike_dir)
    model = load_lazily(traced_scoutlike / "prefill.onnx", SpillFile(tmp_path / "prefill.spill"), source)
    readers = [v.const_value for v in model.graph.initializers.values() if isinstance(v.const_value, SourceTensor)]
    assert len(readers) == 2 * len(source.config.moe_layers) > 0  # gate_up and down of every MoE layer
    optimize(model, "onnxruntime", quantization=QuantSpec("int4", 32))
    initializers = list(model.graph.initializers.values())
    external = [v for v in initializers if isinstance(v.const_value, ir.ExternalTensor)]
    in_memory = [v.name for v in initializers if v not in external and v.const_value.size > SPILL_MIN_ELEMENTS]
    assert in_memory == []
    assert any(v.name.endswith(".e0.nbits") for v in external) and (tmp_path / "prefill.spill").stat().st_size > 0
    assert [v.name for v in external if v.const_value.raw is not None] == []
    assert [t.name for t in readers if t._experts is not None] == []


def test_spilled_tensors_are_written_from_their_arrays_without_a_copy(tmp_path):
    """Spilling writes an array's own memory (tobytes() would hold a second copy: 4.1 GB for Scout's transposed
    lm_head) and stores the bytes ONNX expects, sub-byte types packed."""
    weight = ir.Tensor(np.arange(24, dtype=np.float32).reshape(4, 6), name="w")
    assert np.shares_memory(np.frombuffer(_stored_bytes(weight), np.uint8), weight.raw)
    packed = ir.Tensor(np.arange(-6, 6, dtype=np.int8).astype(ml_dtypes.int4), dtype=ir.DataType.INT4, name="q")
    spill = SpillFile(tmp_path / "spill")
    for tensor in (weight, packed, ir.Tensor(np.arange(24, dtype=np.float32).reshape(4, 6).T, name="t")):
        assert spill.store(tensor).tobytes() == tensor.tobytes()


# ------------------------------------------------------------------------------------------------ one-line errors
def test_checkpoint_that_does_not_match_the_preset_names_the_field(scoutlike_dir):
    with pytest.raises(CheckpointError, match=r"config\.json: vocab_size is 1024 but preset scout has 202048"):
        CheckpointWeights(scoutlike_dir, preset="scout")


def test_checkpoint_with_a_missing_layer_tensor_is_refused(tmp_path):
    checkpoint = save_checkpoint(from_preset("scout-tiny"), tmp_path / "ckpt")
    from safetensors.torch import load_file, save_file

    weights = load_file(checkpoint / "model.safetensors")
    del weights["model.layers.5.self_attn.q_proj.weight"]
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    result = CliRunner().invoke(export_app, ["--stream", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "model.layers.5.self_attn.q_proj.weight' is missing" in result.output
    assert not (tmp_path / "o").exists()


def test_full_size_preset_without_weights_says_where_they_come_from(tmp_path):
    result = CliRunner().invoke(export_app, ["--model", "scout", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    line = " ".join(result.output.split())
    assert "meta-llama/Llama-4-Scout-17B-16E" in line and "216 GB in bf16" in line and "--random-weights" in line


def test_not_enough_disk_is_refused_up_front(tmp_path, monkeypatch):
    config = get_preset("scout")
    need = pipeline.required_disk_bytes(config, "fp16", optimize=True, target="onnxruntime")
    assert need == 2 * 2 * parameter_counts(config).total  # fp16 weights, and the optimized copy beside them
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**9, 10**9))
    with pytest.raises(pipeline.DiskSpaceError, match=r"needs about 4[0-9]{2}\.[0-9] GB free but .* has 1\.0 GB"):
        pipeline.check_disk_space(tmp_path / "out", need)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**3, 10**3))
    with pytest.raises(pipeline.DiskSpaceError, match=r"needs about [1-9][0-9.]* MB free but .* has 0\.0 MB"):
        api.export_model(tmp_path / "out", model="scout-tiny", show_progress=False)  # scout-tiny needs a few MB
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_the_disk_check_counts_the_traced_weights_in_the_type_they_are_traced_in(tmp_path, monkeypatch, target):
    """The up-front disk check counts an int4 export's traced graphs as the disk they take (allocated blocks: the
    deferred experts are holes). TensorRT's are traced in fp16; counted in fp32 they over-stated Scout int4's need by
    26 GB (232 → 206 GB) and refused exports that fit."""
    allocated = {}
    write_graphs = pipeline.write_graphs

    def measured(graphs, directory, *args, **kwargs):
        write_graphs(graphs, directory, *args, **kwargs)
        allocated[Path(directory).name] = sum(f.stat().st_blocks * 512 for f in Path(directory).iterdir()
                                              if f.suffix != ".onnx")

    monkeypatch.setattr(pipeline, "write_graphs", measured)
    api.export_model(tmp_path / "o", model="scout-tiny", precision="int4", target=target, random_weights=True, layers=2,
                     quant=pipeline.QuantOptions(int4_algo="rtn", report=False), show_progress=False)
    counted = pipeline.traced_weight_bytes(get_preset("scout-tiny", layers=2), "int4", target)
    assert allocated["traced0"] == pytest.approx(counted, rel=0.05)


@pytest.mark.parametrize("target, options", [("onnxruntime", {}), ("onnxruntime", {"float_embeddings": True}),
                                             ("tensorrt", {}), ("tensorrt", {"quantize_lm_head": True})])
def test_the_disk_check_counts_the_artifact_it_writes(tmp_path, target, options):
    """The written artifact in the disk check is the int4 artifact itself, embedding and lm_head as stored (4 / 8-bit
    on ONNX Runtime's default): it counted them twice, once in bf16 and once in float, and on TensorRT counted the
    shared expert 4-bit while it was written 16-bit."""
    config = get_preset("scout-tiny", layers=2)
    quant = pipeline.QuantOptions(int4_algo="rtn", report=False, **options)
    api.export_model(tmp_path / "o", model="scout-tiny", precision="int4", target=target, random_weights=True, layers=2,
                     quant=quant, show_progress=False)
    spec = dataclasses.replace(quant, block_size=pipeline.default_block_size(config)).spec_for("int4", target)
    counted = pipeline.artifact_weight_bytes(config, "int4", target, spec)
    assert initializer_bytes(tmp_path / "o") == pytest.approx(counted, rel=0.02)
    if target == "onnxruntime" and not options:  # `inspect`'s figure for this default (it assumed block 128 and
        # 16-bit scales and norms: 13 % under at scout-tiny's block of 32)
        assert initializer_bytes(tmp_path / "o") == pytest.approx(weight_bytes(config)["int4_onnxruntime"], rel=0.02)


def test_awq_without_the_memory_is_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "available_memory", lambda: 10**6)
    with pytest.raises(ConfigError, match=r"--int4-algo awq: the scale search needs about .* use --int4-algo rtn"):
        api.export_model(tmp_path / "o", model="scout-tiny", precision="int4", stream=True, show_progress=False)
    assert not (tmp_path / "o").exists()
    # Scout at the default 128 × 512 calibration tokens: one expert's statistics at a time fit this 24 GB machine
    assert pipeline.awq_memory_bytes(get_preset("scout"), 128, 512) < 10.8e9
