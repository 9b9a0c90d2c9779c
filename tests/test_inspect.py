"""`llama4-export inspect`: architecture arithmetic against published sizes and against instantiated models."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llama4_export.cli.export import export_app
from llama4_export.model import get_preset, parameter_counts


def inspect_json(*args: str) -> dict:
    result = CliRunner().invoke(export_app, ["inspect", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    "preset, total_b, active_b", [("scout", 109, 17), ("maverick", 400, 17), ("behemoth", 2000, 288)]
)
def test_full_presets_match_published_sizes(preset, total_b, active_b):
    s = inspect_json("--model", preset)
    # Meta's names round: Scout's 107.8B prints as 109B (vision tower included), Behemoth's as "~2T".
    assert s["total_params"] / 1e9 == pytest.approx(total_b, rel=0.07)
    assert s["active_params"] / 1e9 == pytest.approx(active_b, rel=0.03)
    assert s["weight_bytes"]["bf16"] == 2 * s["total_params"]
    assert s["weight_bytes"]["int4"] < s["weight_bytes"]["fp8"] < s["weight_bytes"]["bf16"]
    # ONNX Runtime's int4 stores the embedding 4-bit and lm_head 8-bit but its block scales fp32 (its graphs' float)
    assert s["weight_bytes"]["int4_onnxruntime"] < s["weight_bytes"]["fp8"]


def test_scout_kv_bytes_per_token_by_hand():
    kv = inspect_json("--model", "scout")["kv_bytes_per_token"]
    per_layer = 8 * 128 * 2 * 2  # kv heads × head_dim × (K, V) × bf16 bytes
    assert kv["total"] == 48 * per_layer == 196608  # DESIGN.md §4: 196 KB / token
    assert kv["global"]["layers"] == 12 and kv["global"]["bytes_per_token"] == 12 * per_layer
    assert kv["chunked"]["capped_at_tokens"] == 8192


def test_maverick_layers_interleave_dense_and_moe():
    s = inspect_json("--model", "maverick")
    ffn = [layer["ffn"] for layer in s["layers"]]
    assert ffn[:4] == ["dense", "moe", "dense", "moe"] and ffn.count("moe") == 24
    assert [layer["index"] for layer in s["layers"] if layer["attention"] == "global"] == list(range(3, 48, 4))
    assert s["layer_kinds"] == {"dense/chunked": 24, "moe/chunked": 12, "moe/global": 12}


@pytest.mark.parametrize("preset", ["scout", "maverick", "behemoth", "scout-tiny", "maverick-tiny"])
def test_counts_equal_transformers_model(preset):
    """transformers' Llama4ForCausalLM (meta device: no memory) is the reference; active = all but the routed experts,
    plus one routed expert per MoE layer (top-1, as Meta counts Scout's and Maverick's 17B)."""
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    config = get_preset(preset)
    fields = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        model = Llama4ForCausalLM(Llama4TextConfig(**fields))
    counts = parameter_counts(config)
    assert counts.total == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert counts.active == counts.total - experts + experts // config.num_local_experts
    assert config.moe_layers and counts.total > counts.active


def test_checkpoint_summary(scoutlike_dir):
    s = inspect_json("--checkpoint", str(scoutlike_dir))
    assert s["layer_kinds"] == {"moe/chunked": 5, "moe/global": 1}
    assert s["attention_chunk_size"] == 64 and s["use_qk_norm"] is True


def test_table_output_mentions_every_section():
    result = CliRunner().invoke(export_app, ["inspect", "--model", "scout-tiny"])
    assert result.exit_code == 0
    for heading in ("parameters", "layers by kind", "weight bytes", "KV cache per token"):
        assert heading in result.stdout


def test_the_python_api_refuses_a_checkpoint_that_is_not_a_path_in_one_line():
    from llama4_export import api
    from llama4_export.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^inspect_model\(checkpoint=5\): expected a directory path or None, not int$"):
        api.inspect_model(checkpoint=5)  # was pathlib's TypeError
