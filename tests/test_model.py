"""The PyTorch model against transformers' Llama4ForCausalLM (the oracle), on identical weights, in fp32."""

from __future__ import annotations

import pytest
import torch
from transformers import Llama4ForCausalLM as HFLlama4

from llama4_export.model import Llama4Config
from llama4_export.model.modeling import KVCache
from llama4_export.weights import from_preset, load
from llama4_export.model.save import save_checkpoint

from .conftest import make_hf_checkpoint


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    err = (ours - ref).abs().max().item()
    bound = rel * ref.abs().max().item()
    assert err <= bound, f"max-abs diff {err:.3g} > {bound:.3g} (= {rel} × max|logit|)"


def hf_logits(directory, ids: torch.Tensor) -> torch.Tensor:
    hf = HFLlama4.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


def random_ids(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_trained_checkpoint_matches_transformers(scoutlike_dir):
    model = load(scoutlike_dir)
    ids = random_ids(model.config.vocab_size, batch=2, length=150)  # chunk 64: crosses twice
    assert_logits_close(model(ids), hf_logits(scoutlike_dir, ids))


# Each case crosses the 8-token chunk at least twice (length 21) and turns one feature off or on.
CONFIGS = {
    "scout-like/qknorm/llama3": dict(
        interleave_moe_layer_step=1, use_qk_norm=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    ),
    "maverick-like/no-qknorm/default-rope": dict(interleave_moe_layer_step=2, use_qk_norm=False, num_hidden_layers=8),
    "step2/qknorm/llama3/no-temperature": dict(
        interleave_moe_layer_step=2, use_qk_norm=True, attn_temperature_tuning=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 16.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 1.0, "original_max_position_embeddings": 8},
    ),
    "step1/no-qknorm/8-experts": dict(interleave_moe_layer_step=1, use_qk_norm=False, num_local_experts=8),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_random_configs_match_transformers(tmp_path, name):
    ckpt = make_hf_checkpoint(tmp_path / "ckpt", dtype=torch.float32, **CONFIGS[name])
    model = load(ckpt)
    ids = random_ids(model.config.vocab_size, batch=2, length=21, seed=1)
    assert_logits_close(model(ids), hf_logits(ckpt, ids))


def test_temperature_tuning_changes_logits_as_in_transformers(tmp_path):
    # floor_scale 4: positions ≥ 3 get a query scale > 1 on the NoPE layer; a wrong position origin would show.
    on = load(make_hf_checkpoint(tmp_path / "on", dtype=torch.float32))
    off = load(make_hf_checkpoint(tmp_path / "off", dtype=torch.float32, attn_temperature_tuning=False))
    ids = random_ids(on.config.vocab_size, 1, 12)
    diff = (on(ids) - off(ids)).abs().amax(dim=-1)[0]
    assert diff[:3].max() == 0 and diff[3:].min() > 0


@pytest.mark.parametrize("preset", ["scout-tiny", "maverick-tiny"])
def test_presets_round_trip_through_transformers(tmp_path, preset):
    model = from_preset(preset, seed=3)
    ckpt = save_checkpoint(model, tmp_path / preset, dtype=torch.float32, max_shard_bytes=1 << 20)
    assert (ckpt / "model.safetensors.index.json").is_file()
    ids = random_ids(model.config.vocab_size, 2, 40)  # chunk 16: crosses twice
    assert_logits_close(model(ids), hf_logits(ckpt, ids))
    assert_logits_close(load(ckpt)(ids), model(ids), rel=0)


def test_bf16_checkpoint_loads_as_each_dtype(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16)
    ref = load(ckpt)
    ids = random_ids(ref.config.vocab_size, 1, 10)
    for dtype in (torch.bfloat16, torch.float16):
        low = load(ckpt, dtype=dtype)
        assert low.lm_head.weight.dtype == dtype
        assert_logits_close(low(ids).float(), ref(ids), rel=5e-2)


def test_preset_weights_are_deterministic():
    a, b, c = from_preset("scout-tiny", seed=0), from_preset("scout-tiny", seed=0), from_preset("scout-tiny", seed=1)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def decode_incrementally(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill `prefill` tokens, then one token at a time through the explicit-cache forward."""
    bsz, length = ids.shape
    cache = KVCache.empty(model.config, bsz, torch.float32)
    positions = torch.arange(length).expand(bsz, length)
    chunks = [(0, prefill)] + [(t, t + 1) for t in range(prefill, length)]
    out = []
    for start, end in chunks:
        logits, new = model(ids[:, start:end], positions[:, start:end], cache)
        cache = cache.append(new, positions[:, start:end])
        out.append(logits)
    return torch.cat(out, dim=1)


def test_incremental_decoding_equals_full_forward_on_trained_checkpoint(scoutlike_dir):
    model = load(scoutlike_dir)
    ids = random_ids(model.config.vocab_size, 2, 140, seed=4)  # decode steps cross 64 and 128
    assert_logits_close(decode_incrementally(model, ids, prefill=50), model(ids))


@pytest.mark.parametrize("preset", ["scout-tiny", "maverick-tiny"])
def test_incremental_decoding_equals_full_forward(preset):
    model = from_preset(preset)
    ids = random_ids(model.config.vocab_size, 2, 40, seed=5)
    assert_logits_close(decode_incrementally(model, ids, prefill=7), model(ids))


@pytest.mark.parametrize("impl", ["gather", "grouped", "dense"])
def test_moe_implementations_agree(impl):
    model = from_preset("scout-tiny", seed=2)
    ids = random_ids(model.config.vocab_size, 2, 20)
    ref = model(ids)
    model.set_moe_impl(impl)
    assert_logits_close(model(ids), ref, rel=1e-5)


def test_decode_reads_only_the_selected_expert():
    """Poison every expert the router does not pick: a decode step that touched them would turn NaN."""
    model = from_preset("scout-tiny", seed=0)
    ids = random_ids(model.config.vocab_size, 3, 1)
    positions = torch.zeros(3, 1, dtype=torch.long)
    cache = KVCache.empty(model.config, 3, torch.float32)
    ref, _ = model(ids, positions, cache)

    picked: dict[int, set[int]] = {}
    hooks = [
        layer.feed_forward.router.register_forward_hook(
            lambda mod, args, out, i=i: picked.setdefault(i, set()).update(out.argmax(-1).flatten().tolist())
        )
        for i, layer in enumerate(model.model.layers)
    ]
    model(ids, positions, cache)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            unused = [e for e in range(model.config.num_local_experts) if e not in picked[i]]
            assert unused, "test needs experts no token picked"
            layer.feed_forward.experts.gate_up_proj[unused] = float("nan")
            layer.feed_forward.experts.down_proj[unused] = float("nan")
    out, _ = model(ids, positions, cache)
    assert torch.isfinite(out).all()
    assert torch.equal(out, ref)


def test_decode_graph_indexes_expert_weights():
    """Op-level view of the same property: in the traced decode step, expert weights feed only index ops."""
    model = from_preset("scout-tiny")
    cache = KVCache.empty(model.config, 1, torch.float32)
    ids, positions = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, ids, positions):
            return self.m(ids, positions, cache)[0]

    graph = torch.export.export(Step(), (ids, positions)).graph_module.graph
    expert_inputs = [n for n in graph.nodes if n.op == "placeholder" and "experts" in n.name]
    assert len(expert_inputs) == 2 * model.config.num_hidden_layers
    users = {u.target.__name__ for n in expert_inputs for u in n.users}
    assert users == {"index.Tensor"}, users


def test_config_accepts_old_new_and_meta_styles():
    base = Llama4Config.from_hf_dict(from_preset("scout-tiny").config.to_hf_dict())
    old_style = base.to_hf_dict()
    rope = old_style.pop("rope_parameters")
    old_style["rope_theta"] = rope.pop("rope_theta")
    old_style["rope_scaling"] = rope
    old_style["torch_dtype"] = old_style.pop("dtype")
    old_style["attn_temperature_tuning"] = 4  # Meta's release writes an int
    parsed = Llama4Config.from_hf_dict(old_style)
    assert parsed == base and parsed.attn_temperature_tuning is True
    multimodal = {"model_type": "llama4", "text_config": base.to_hf_dict(), "vision_config": {}}
    assert Llama4Config.from_hf_dict(multimodal) == base


def test_multimodal_checkpoint_layout_loads(tmp_path):
    """Llama4ForConditionalGeneration checkpoints: nested text_config, text weights under language_model."""
    from safetensors.torch import load_file, save_file

    from llama4_export.artifact import write_json

    text = make_hf_checkpoint(tmp_path / "text", dtype=torch.float32)
    mm = tmp_path / "mm"
    mm.mkdir()
    import json

    cfg = json.loads((text / "config.json").read_text())
    write_json(mm / "config.json", {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"], "text_config": cfg})
    weights = {f"language_model.{k}": v for k, v in load_file(text / "model.safetensors").items()}
    weights["vision_model.patch_embedding.weight"] = torch.zeros(2, 2)
    save_file(weights, mm / "model.safetensors")
    ids = random_ids(cfg["vocab_size"], 1, 9)
    assert_logits_close(load(mm)(ids), load(text)(ids), rel=0)
