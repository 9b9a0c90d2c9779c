"""AWQ (calib/awq.py, calib/awq_plans.py): the scale search agrees with a direct search on the activations, is never
worse than RTN on its calibration data, and the planned weights handed out slice by slice (AwqWeights) are the plans
applied to whole tensors, bit for bit, on fp32 and bf16 checkpoints with dense and MoE layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llama4_export.calib import awq_plans
from llama4_export.calib.awq import ALPHAS, replay
from llama4_export.calib.awq_plans import AwqWeights, plan_file, read_plan
from llama4_export.calib.calibrate import calibrate
from llama4_export.calib.corpus import CalibrationError, Corpus
from llama4_export.errors import Llama4ExportError
from llama4_export.graph_passes.quantize import int4_blockwise, int4_dequantize
from llama4_export.weights import CheckpointWeights, load, source as source_module

from .conftest import make_hf_checkpoint

# A dense layer and an MoE layer (interleave step 2); fp32 or bf16 on disk.
SMALL = dict(num_hidden_layers=2, interleave_moe_layer_step=2)
BLOCK = 16


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("awq")
    return {name: make_hf_checkpoint(root / name, seed=3, dtype=dtype, **SMALL)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def _samples(vocab: int, count: int, length: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, vocab, (count, length))


def _plans(base: CheckpointWeights, samples: np.ndarray, directory):
    return awq_plans.awq_plans(base, samples, BLOCK, directory, key="test")


@pytest.mark.parametrize("stored", ["fp32", "bf16"])
def test_weights_handed_out_in_slices_are_the_plans_applied_to_whole_tensors(checkpoints, stored, tmp_path, monkeypatch):
    base = CheckpointWeights(checkpoints[stored])
    samples = _samples(base.config.vocab_size, 2, 16)
    records, _ = _plans(base, samples, tmp_path / "plans")
    # the reference: every tensor read whole, each plan's ops replayed on it (per expert for the routed experts)
    expected = {name: base.tensor(name) for name in base.shapes}
    for layer in range(base.config.num_hidden_layers):
        path = plan_file(tmp_path / "plans", layer)
        from safetensors.torch import load_file

        operands = load_file(path)
        for entry in read_plan(path)["ops"]:
            ops = [awq_plans.Op(*op) for op in entry["ops"]]
            target = expected[entry["tensor"]] if entry["expert"] is None else expected[entry["tensor"]][entry["expert"]]
            replay(target, ops, operands)
    limit = 8192  # an expert here is 24 KB: the base's slices split experts and AwqWeights hands each out in pieces
    monkeypatch.setattr(source_module, "CHUNK_BYTES", limit)
    monkeypatch.setattr(awq_plans, "CHUNK_BYTES", limit)
    source = AwqWeights(base, tmp_path / "plans")
    for name, tensor in expected.items():
        pieces = list(source.chunks(name, torch.float32))
        assert all(piece.nbytes <= limit for piece in pieces), name
        assert torch.equal(torch.cat([p.reshape(-1) for p in pieces]).reshape(tensor.shape), tensor), name
    experts = "model.layers.1.feed_forward.experts.gate_up_proj"
    changed = {name for name in expected if not torch.equal(expected[name], base.tensor(name))}
    assert {experts, "model.layers.0.input_layernorm.weight", "model.layers.1.feed_forward.router.weight"} <= changed
    assert source.lossless_dtype(experts) == torch.float32
    assert base.lossless_dtype(experts) == (torch.bfloat16 if stored == "bf16" else torch.float32)
    assert all(r["mse"] <= r["rtn_mse"] for r in records)  # α = 0 is RTN itself: never worse on calibration data


def test_the_scale_search_agrees_with_a_direct_search_on_the_activations(checkpoints, tmp_path):
    """Layer 0's q/k/v group: the α the Gram-matrix search picks is the one minimizing the output MSE computed from
    the stored activations with the graph's own INT4 quantizer (graph_passes/quantize.py)."""
    base = CheckpointWeights(checkpoints["fp32"])
    samples = _samples(base.config.vocab_size, 2, 16)
    records, _ = _plans(base, samples, tmp_path / "plans")
    model = load(checkpoints["fp32"])
    attn = model.model.layers[0].self_attn
    inputs = []
    handle = attn.q_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for row in samples:
            model(torch.from_numpy(row[None]))
    handle.remove()
    x = torch.cat(inputs).double().numpy()
    weights = [p.weight.detach().double().numpy() for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    base_s = np.maximum(np.abs(x).mean(0), 1e-8)
    errors = []
    for alpha in ALPHAS:
        s = base_s ** alpha
        s = s / np.sqrt(s.max() * s.min())
        err = 0.0
        for w in weights:
            q, scale = int4_blockwise(w * s, BLOCK, axis=1)
            delta = (int4_dequantize(q, scale, BLOCK, axis=1) - w * s) / s
            err += float(((x @ delta.T) ** 2).sum() / len(x))
        errors.append(err)
    qkv = next(r for r in records if r["group"] == "layers.0.qkv")
    assert qkv["alpha"] == ALPHAS[int(np.argmin(errors))]
    assert qkv["mse"] == pytest.approx(min(errors), rel=1e-3) and qkv["rtn_mse"] == pytest.approx(errors[0], rel=1e-3)


def test_plans_are_cached_and_reused(checkpoints, tmp_path):
    base = CheckpointWeights(checkpoints["fp32"])
    samples = _samples(base.config.vocab_size, 1, 8)
    text = Corpus(("unused: the samples are given",), "test")
    first = calibrate(base, samples, text, tmp_path / "calib.safetensors", awq_block=BLOCK)
    again = calibrate(base, samples, text, tmp_path / "calib.safetensors", awq_block=BLOCK)
    assert not first.reused and again.reused and again.awq_records == first.awq_records
    assert again.awq_plans == tmp_path / "calib.awq16" and not list(tmp_path.glob(".*"))


def test_a_missing_plan_is_one_clear_error(checkpoints, tmp_path):
    base = CheckpointWeights(checkpoints["fp32"])
    _plans(base, _samples(base.config.vocab_size, 1, 8), tmp_path / "plans")
    plan_file(tmp_path / "plans", 1).unlink()
    with pytest.raises(CalibrationError, match="layer00001.safetensors: the AWQ plan of layer 1 is missing") as caught:
        AwqWeights(base, tmp_path / "plans")
    assert isinstance(caught.value, Llama4ExportError) and "\n" not in str(caught.value)
