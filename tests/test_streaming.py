"""Layer-streaming export (export/streaming.py): same bytes as the in-memory path, weights never all in memory,
random weights per tensor, and one-line errors for checkpoints that do not fit the preset or the disk."""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from llama4_export.calib.calibrate import activation_amax
from llama4_export.calib.stats import collect_statistics
from llama4_export.calib.streamed import streamed_statistics
from llama4_export.artifact import read_manifest
from llama4_export.cli import export_app
from llama4_export.errors import CheckpointError, ConfigError
from llama4_export.export import io_spec
from llama4_export.export.pipeline import _linear_weight_names
from llama4_export.export.streaming import (
    CHUNK_BYTES, SPILL_MIN_ELEMENTS, CheckpointWeights, DiskSpaceError, RandomWeights, SourceTensor, SpillFile,
    _load_streaming, attach_deferred, check_disk_space, export_streamed, export_streamed_artifact, optimize_streamed,
    required_disk_bytes,
)
from llama4_export.graph_passes import optimize_artifact
from llama4_export.graph_passes.pipeline import optimize
from llama4_export.graph_passes.quantize import QuantSpec
from llama4_export.model.config import get_preset
from llama4_export.model.loader import _finish, from_preset, load
from llama4_export.model.modeling import Llama4ForCausalLM
from llama4_export.model.save import save_checkpoint
from llama4_export.model.summary import parameter_counts


def _same_files(a: Path, b: Path) -> list[str]:
    """Names of files that differ (or exist on one side only)."""
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    return [n for n in names if not ((a / n).is_file() and (b / n).is_file() and filecmp.cmp(a / n, b / n, shallow=False))]


@pytest.fixture(scope="module")
def streamed_scoutlike(tmp_path_factory, scoutlike_dir) -> Path:
    out = tmp_path_factory.mktemp("streamed") / "scoutlike"
    export_streamed(out, CheckpointWeights(scoutlike_dir), show_progress=False)
    return out


def test_streamed_export_is_byte_identical_to_in_memory(streamed_scoutlike, scoutlike_artifact):
    assert _same_files(streamed_scoutlike, scoutlike_artifact) == []


def test_streamed_int4_passes_are_byte_identical_to_in_memory(streamed_scoutlike, scoutlike_artifact, tmp_path):
    memory, streamed = tmp_path / "memory", tmp_path / "streamed"
    shutil.copytree(scoutlike_artifact, memory)
    shutil.copytree(streamed_scoutlike, streamed)
    spec = QuantSpec("int4", 32)
    optimize_artifact(memory, "onnxruntime", quantization=spec, show_progress=False)
    optimize_streamed(streamed, "onnxruntime", quantization=QuantSpec("int4", 32), show_progress=False)
    assert _same_files(streamed, memory) == []
    assert not list(tmp_path.glob(".*spill*"))  # the scratch file is gone


def test_passes_leave_weights_on_disk(streamed_scoutlike, tmp_path):
    """After the passes (quantization + the ONNX Runtime MoE re-layout), no large tensor sits in memory and no weight
    file stays mapped: every created tensor was spilled, every read unmapped again."""
    model = _load_streaming(streamed_scoutlike / "prefill.onnx", SpillFile(tmp_path / "prefill.spill"))
    optimize(model, "onnxruntime", quantization=QuantSpec("int4", 32))
    initializers = list(model.graph.initializers.values())
    external = [v for v in initializers if isinstance(v.const_value, ir.ExternalTensor)]
    in_memory = [v.name for v in initializers if v not in external and v.const_value.size > SPILL_MIN_ELEMENTS]
    assert in_memory == []
    assert any(v.name.endswith(".int4") for v in external) and (tmp_path / "prefill.spill").stat().st_size > 0
    assert [v.name for v in external if v.const_value.raw is not None] == []


def test_experts_read_from_the_checkpoint_hold_no_buffer_after_the_passes(streamed_scoutlike, scoutlike_dir, tmp_path):
    """The quantization passes read checkpoint experts one at a time; once a tensor's last expert is read its reader
    (with that expert's buffer) is dropped, or every layer's would stay in memory for the life of the graphs."""
    model = _load_streaming(streamed_scoutlike / "prefill.onnx", SpillFile(tmp_path / "prefill.spill"))
    checkpoint = CheckpointWeights(scoutlike_dir)
    attach_deferred(model, checkpoint)
    sources = [v.const_value for v in model.graph.initializers.values() if isinstance(v.const_value, SourceTensor)]
    assert len(sources) == 2 * len(checkpoint.config.moe_layers) > 0  # gate_up and down of every MoE layer
    optimize(model, "onnxruntime", quantization=QuantSpec("int4", 32))
    assert [t.name for t in sources if t._experts is not None] == []


def test_layerwise_calibration_equals_in_memory_statistics_and_fp8_artifact(scoutlike_dir, streamed_scoutlike, tmp_path):
    """Sequential layer-wise statistics are collect_statistics' on the whole model, bit for bit; the FP8 graphs and
    weights quantized with them are the in-memory path's bytes."""
    samples = np.random.default_rng(0).integers(0, 1000, (1, 32))
    streamed = streamed_statistics(CheckpointWeights(scoutlike_dir), samples)
    reference = collect_statistics(load(scoutlike_dir), samples)
    assert sorted(streamed) == sorted(reference)
    assert [k for k in reference if not np.array_equal(streamed[k], reference[k])] == []
    # FP8's statistics (no Gram matrices, no routed-expert sites): the same values, and only those
    fp8_stats = streamed_statistics(CheckpointWeights(scoutlike_dir), samples, for_awq=False)
    assert [k for k in fp8_stats if k.endswith(".gram") or ".expert_" in k] == []
    assert {k.rsplit(".", 1)[0] for k in fp8_stats} >= {"layers.0.attn_in", "layers.5.down_in", "layers.3.new_key", "final_in"}
    assert [k for k in fp8_stats if not np.array_equal(fp8_stats[k], reference[k])] == []
    streamed = fp8_stats
    memory, streaming = tmp_path / "memory", tmp_path / "streamed"
    shutil.copytree(streamed_scoutlike, memory)
    shutil.copytree(streamed_scoutlike, streaming)
    names = _linear_weight_names(memory)
    optimize_artifact(memory, "onnxruntime", quantization=QuantSpec("fp8", activation_amax=activation_amax(reference, names)),
                      show_progress=False)
    optimize_streamed(streaming, "onnxruntime", quantization=QuantSpec("fp8", activation_amax=activation_amax(streamed, names)),
                      show_progress=False)
    assert _same_files(streaming, memory) == []


def _model_from(source: RandomWeights) -> Llama4ForCausalLM:
    with torch.device("meta"):
        model = Llama4ForCausalLM(source.config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.cat(list(source.chunks(name, torch.float32))))
    return _finish(model, source.config)


def test_random_weights_artifact_matches_pytorch_model(tmp_path):
    """--random-weights --layers 1 through the CLI; the prefill graph on ONNX Runtime vs our PyTorch model holding the
    same per-tensor random weights."""
    out = tmp_path / "random"
    result = CliRunner().invoke(export_app, ["--model", "scout-tiny", "--random-weights", "--layers", "1", "--seed", "3",
                                             "--target", "onnxruntime", "--out", str(out)])
    assert result.exit_code == 0, result.output
    source = RandomWeights("scout-tiny", seed=3, layers=1)
    config = source.config
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, 9))
    feeds = {io_spec.INPUT_IDS: ids, io_spec.POSITIONS: np.arange(9)[None],
             io_spec.PAST_POSITIONS["chunked"]: np.zeros((1, 0), np.int64), io_spec.PAST_POSITIONS["global"]: np.zeros((1, 0), np.int64)}
    for i in range(config.num_hidden_layers):
        empty = np.zeros((1, config.num_key_value_heads, 0, config.head_dim), np.float32)
        feeds[io_spec.past_key(i)], feeds[io_spec.past_value(i)] = empty, empty
    session = ort.InferenceSession(str(out / "prefill.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run([io_spec.LOGITS], feeds)[0]
    reference = _model_from(source)(torch.from_numpy(ids)).numpy()
    assert np.abs(logits - reference).max() <= 1e-5 * np.abs(reference).max()


def test_random_weights_are_per_tensor_deterministic_and_sliced():
    scout = RandomWeights("scout", seed=1, layers=1)
    name = "model.layers.0.self_attn.k_proj.weight"
    first = torch.cat(list(scout.chunks(name, torch.float32)))
    assert tuple(first.shape) == (8 * 128, 5120)
    assert torch.equal(first, torch.cat(list(RandomWeights("scout", seed=1, layers=1).chunks(name, torch.float32))))
    assert not torch.equal(first, torch.cat(list(RandomWeights("scout", seed=2, layers=1).chunks(name, torch.float32))))
    assert abs(float(first.std()) - 0.02) < 1e-3
    # A full-size expert tensor (16 × 5120 × 16384, 5.4 GB in fp32) comes in slices of at most CHUNK_BYTES.
    piece = next(scout.chunks("model.layers.0.feed_forward.experts.gate_up_proj", torch.float32))
    assert piece.shape[2:] == (16384,) and piece.numel() * 4 <= CHUNK_BYTES


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
    need = required_disk_bytes(config, "fp16", optimize=True)
    assert need == 2 * 2 * parameter_counts(config).total  # fp16 weights, and the optimized copy beside them
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**9, 10**9))
    with pytest.raises(DiskSpaceError, match=r"needs about 4[0-9]{2}\.[0-9] GB free but .* has 1\.0 GB"):
        check_disk_space(tmp_path / "out", need)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**3, 10**3))
    with pytest.raises(DiskSpaceError):  # scout-tiny needs a few MB
        export_streamed_artifact(tmp_path / "out", RandomWeights("scout-tiny"), "fp32")
    assert not (tmp_path / "out").exists()


def test_a_disk_that_fills_up_during_the_passes_gives_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from llama4_export.export import streaming

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "scratch"))

    monkeypatch.setattr(streaming, "optimize_streamed", full)
    result = CliRunner().invoke(export_app, ["--model", "scout-tiny", "--random-weights", "--layers", "1", "--precision",
                                             "int4", "--int4-algo", "rtn", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "the disk filled up while writing" in result.output and "free space and run again" in result.output
    assert list(tmp_path.iterdir()) == []  # neither the fp32 intermediate nor a temp directory is left


def test_streamed_int4_awq_artifact_is_the_in_memory_one(tmp_path):
    """`--stream --precision int4` (AWQ: layer-wise statistics, per-layer plans replayed as the weights are written)
    gives the in-memory AWQ export's graphs and weights byte for byte (bf16 checkpoint, a dense and an MoE layer)."""
    from .conftest import make_hf_checkpoint

    # vocabulary and special ids that leave room for the byte-level tokenizer (the checkpoint has no tokenizer.json)
    checkpoint = make_hf_checkpoint(tmp_path / "ckpt", seed=5, num_hidden_layers=2, interleave_moe_layer_step=2, vocab_size=320,
                                    bos_token_id=256, eos_token_id=257, pad_token_id=258)
    common = ["--checkpoint", str(checkpoint), "--precision", "int4", "--block-size", "32", "--calib-samples", "2",
              "--calib-seq-len", "16", "--no-report", "--target", "onnxruntime"]
    memory = CliRunner().invoke(export_app, [*common, "--calib-cache", str(tmp_path / "calib"), "--out", str(tmp_path / "memory")])
    assert memory.exit_code == 0, memory.output
    streamed = CliRunner().invoke(export_app, [*common, "--stream", "--out", str(tmp_path / "streamed")])
    assert streamed.exit_code == 0, streamed.output
    for name in ("decode.onnx", "prefill.onnx", "model.data"):
        assert filecmp.cmp(tmp_path / "memory" / name, tmp_path / "streamed" / name, shallow=False), name
    quantization = read_manifest(tmp_path / "streamed")["quantization"]
    assert quantization["algorithm"] == "awq" and quantization["awq"] == read_manifest(tmp_path / "memory")["quantization"]["awq"]
    assert not list(tmp_path.glob(".*awq*"))  # the plans are gone


def test_streaming_refuses_awq_without_the_memory_and_bad_layer_counts(tmp_path, monkeypatch):
    from llama4_export.export import streaming

    monkeypatch.setattr(streaming, "_available_memory", lambda: 10**6)
    with pytest.raises(ConfigError, match=r"--int4-algo awq: the scale search needs about 0\.0 GB .* use --int4-algo rtn"):
        export_streamed_artifact(tmp_path / "o", RandomWeights("scout-tiny"), "int4", int4_algo="awq")
    assert not (tmp_path / "o").exists()
    assert streaming.awq_statistics_bytes(get_preset("scout")) > 24e9  # Scout's Gram matrices: not on this machine
    with pytest.raises(ConfigError, match="--layers 9: preset scout-tiny has 8 layers"):
        RandomWeights("scout-tiny", layers=9)


def test_streamed_fp8_with_fp8_kv_cache_takes_its_scales_from_layerwise_calibration(tmp_path):
    """--random-weights --precision fp8 --kv-cache-dtype fp8 through the CLI: the cache inputs are float8 and each
    layer's K/V scale is the max |new_key| / |new_value| of the whole PyTorch model (calib.stats hooks) / 448."""
    from llama4_export.calib.calibrate import calibration_samples, tokenizer_for
    from llama4_export.calib.stats import kv_cache_amax
    from llama4_export.runtime import Generator

    out = tmp_path / "fp8kv"
    result = CliRunner().invoke(export_app, ["--model", "scout-tiny", "--random-weights", "--layers", "2", "--precision", "fp8",
                                             "--kv-cache-dtype", "fp8", "--calib-samples", "2", "--calib-seq-len", "16",
                                             "--target", "onnxruntime", "--out", str(out)])
    assert result.exit_code == 0, result.output
    source = RandomWeights("scout-tiny", layers=2)
    samples, _ = calibration_samples(source, source.config, tokenizer_for(source, source.config), None, 2, 16)
    expected = kv_cache_amax(collect_statistics(_model_from(source), samples), 2)
    decode = ir.load(out / "decode.onnx")
    inputs = {v.name: v for v in decode.graph.inputs}
    for layer, (key_amax, value_amax) in expected.items():
        assert inputs[io_spec.past_key(layer)].dtype == ir.DataType.FLOAT8E4M3FN
        scales = decode.graph.initializers
        assert scales[f"kv_cache.{layer}.key_scale"].const_value.numpy() == np.float32(key_amax / 448)
        assert scales[f"kv_cache.{layer}.value_scale"].const_value.numpy() == np.float32(value_amax / 448)
    assert len(Generator.load(out).generate("hello", max_new_tokens=4).token_ids) == 4
