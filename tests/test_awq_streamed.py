"""AWQ streamed (calib/awq_streamed.py): the AwqWeights hand out, bit for bit, the parameters the in-memory apply_awq
leaves, on fp32 and bf16 checkpoints with dense and MoE layers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from llama4_export.calib import awq_streamed
from llama4_export.calib.awq import apply_awq
from llama4_export.calib.awq_streamed import AwqWeights, awq_plans_streamed, plan_file
from llama4_export.calib.corpus import CalibrationError
from llama4_export.calib.stats import collect_statistics
from llama4_export.errors import Llama4ExportError
from llama4_export.export import streaming
from llama4_export.export.streaming import CheckpointWeights
from llama4_export.model.loader import load

from .conftest import make_hf_checkpoint

# A dense layer and an MoE layer (interleave step 2); fp32 or bf16 on disk.
SMALL = dict(num_hidden_layers=2, interleave_moe_layer_step=2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("awq")
    return {name: make_hf_checkpoint(root / name, seed=3, dtype=dtype, **SMALL)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def _samples(vocab: int, count: int, length: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, vocab, (count, length))


def _differing(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    assert sorted(got) == sorted(expected)
    return [name for name in expected if not torch.equal(got[name], expected[name])]


def _streamed_tensors(source: AwqWeights, shapes: dict[str, tuple[int, ...]], limit: int) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, shape in shapes.items():
        pieces = list(source.chunks(name, torch.float32))
        assert all(piece.nbytes <= limit for piece in pieces), name
        tensors[name] = torch.cat([piece.reshape(-1) for piece in pieces]).reshape(shape)
    return tensors


@pytest.mark.parametrize("stored", ["fp32", "bf16"])
def test_streamed_awq_weights_are_in_memory_apply_awq_bit_for_bit(checkpoints, stored, tmp_path, monkeypatch):
    # Small slices (an expert here is 24 KB): the base's slices split experts and AwqWeights hands each out in pieces.
    limit = 8192
    monkeypatch.setattr(streaming, "CHUNK_BYTES", limit)
    monkeypatch.setattr(awq_streamed, "CHUNK_BYTES", limit)
    block = 16
    model = load(checkpoints[stored]).eval()
    samples = _samples(model.config.vocab_size, 2, 16)
    stats = collect_statistics(model, samples)
    records = apply_awq(model, stats, block)
    base = CheckpointWeights(checkpoints[stored])
    directory, streamed_records, streamed_stats = awq_plans_streamed(base, samples, block, tmp_path / "plans")
    assert streamed_records == records
    # the statistics come back without their Gram matrices (FP8 KV-cache scales), with collect_statistics' values
    assert sorted(streamed_stats) == sorted(k for k in stats if not k.endswith(".gram"))
    assert [k for k in streamed_stats if not np.array_equal(streamed_stats[k], stats[k])] == []
    source = AwqWeights(base, directory)
    expected = dict(model.named_parameters())
    got = _streamed_tensors(source, {name: tuple(p.shape) for name, p in expected.items()}, limit)
    assert _differing(got, expected) == []
    experts = "model.layers.1.feed_forward.experts.gate_up_proj"
    changed = {name for name, p in load(checkpoints[stored]).named_parameters() if not torch.equal(p, expected[name])}
    assert {experts, "model.layers.0.input_layernorm.weight", "model.layers.1.feed_forward.router.weight"} <= changed
    assert source.lossless_dtype(experts) == torch.float32
    assert base.lossless_dtype(experts) == (torch.bfloat16 if stored == "bf16" else torch.float32)
    assert source.lossless_dtype("model.embed_tokens.weight") == base.lossless_dtype("model.embed_tokens.weight")


def test_a_missing_plan_is_one_clear_error(checkpoints, tmp_path):
    base = CheckpointWeights(checkpoints["fp32"])
    directory, _, _ = awq_plans_streamed(base, _samples(base.config.vocab_size, 1, 8), 16, tmp_path / "plans")
    plan_file(directory, 1).unlink()
    with pytest.raises(CalibrationError, match="layer00001.safetensors: the AWQ plan of layer 1 is missing") as caught:
        AwqWeights(base, directory)
    assert isinstance(caught.value, Llama4ExportError) and "\n" not in str(caught.value)


def _first_layers(checkpoint: Path, layers: int, out: Path) -> Path:
    """A copy of `checkpoint` holding only its first `layers` decoder layers (AWQ's search costs ~1 s per layer)."""
    config = json.loads((checkpoint / "config.json").read_text())
    config["num_hidden_layers"] = layers
    for key in ("layer_types", "no_rope_layers"):
        config[key] = config[key][:layers]
    config["moe_layers"] = [i for i in config["moe_layers"] if i < layers]
    tensors = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(shard))
    kept = {name: t for name, t in tensors.items()
            if not name.startswith("model.layers.") or int(name.split(".")[2]) < layers}
    out.mkdir()
    save_file(kept, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_streamed_awq_on_the_trained_scoutlike_checkpoint(scoutlike_dir, tmp_path):
    """Trained bf16 weights, block 128 (the default), 2 × 32 tokens, the checkpoint cut to its first layer."""
    checkpoint = _first_layers(scoutlike_dir, 1, tmp_path / "scoutlike1")
    model = load(checkpoint).eval()
    samples = _samples(model.config.vocab_size, 2, 32)
    records = apply_awq(model, collect_statistics(model, samples), 128)
    directory, streamed_records, _ = awq_plans_streamed(CheckpointWeights(checkpoint), samples, 128, tmp_path / "plans")
    assert streamed_records == records
    source = AwqWeights(CheckpointWeights(checkpoint), directory)
    expected = dict(model.named_parameters())
    got = _streamed_tensors(source, {name: tuple(p.shape) for name, p in expected.items()}, streaming.CHUNK_BYTES)
    assert _differing(got, expected) == []
