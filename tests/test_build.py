"""The Python-only parts of the TensorRT stage: profiles, the engine manifest entry, messages when TensorRT is absent."""

from __future__ import annotations

import json

import pytest

from llama4_export.artifact import read_manifest, sha256_file, write_manifest
from llama4_export.tensorrt.engine import tensorrt_problem
from llama4_export.tensorrt.errors import BuildError
from llama4_export.tensorrt.profiles import build_limits, engine_profiles
from llama4_export.tensorrt.engine import INSTALL_HINT, write_engine_manifest
from llama4_export.model import get_preset

TRT_MISSING = tensorrt_problem()


def manifest_for(preset: str, max_prefill: int = 32, kv_cache: str = "float16") -> dict:
    """The parts of an export manifest the build reads."""
    return {
        "model": get_preset(preset).to_hf_dict(),
        "graphs": {"decode": {"file": "decode.onnx", "new_tokens": 1, "max_new_tokens": 1},
                   "prefill": {"file": "prefill.onnx", "new_tokens": None, "max_new_tokens": max_prefill}},
        "dtypes": {"logits": "float32", "kv_cache": kv_cache},
    }


def test_profiles_follow_batch_prefill_and_kv_windows():
    config = get_preset("scout-tiny")
    manifest = manifest_for("scout-tiny")
    limits = build_limits(manifest, max_batch=4, max_prefill=24, window=40)
    assert limits.to_json() == {"max_batch": 4, "max_prefill": 24, "chunk_slots": config.attention_chunk_size,
                                "global_slots": 40}
    profiles = engine_profiles(manifest, limits)
    assert set(profiles) == {"decode", "prefill"}
    prefill, decode = profiles["prefill"], profiles["decode"]
    assert prefill["input_ids"].to_json() == {"min": [1, 1], "opt": [4, 24], "max": [4, 24]}
    assert decode["input_ids"].to_json() == {"min": [1, 1], "opt": [4, 1], "max": [4, 1]}
    assert decode["past_positions_global"].to_json() == {"min": [1, 40], "opt": [4, 40], "max": [4, 40]}
    chunk = config.attention_chunk_size
    assert decode["past_positions_chunked"].max == (4, chunk)
    kvh, d = config.num_key_value_heads, config.head_dim
    for layer in range(config.num_hidden_layers):
        slots = chunk if config.uses_rope(layer) else 40
        assert prefill[f"past_key.{layer}"].min == (1, kvh, slots, d)
        assert prefill[f"past_value.{layer}"].max == (4, kvh, slots, d)
    expected_inputs = 4 + 2 * config.num_hidden_layers
    assert len(decode) == expected_inputs and len(prefill) == expected_inputs + 1  # prefill takes logits_index
    assert prefill["logits_index"].to_json() == {"min": [1, 1], "opt": [4, 24], "max": [4, 24]}


def test_default_limits_come_from_the_export_and_the_runtime_window():
    from llama4_export.runtime import default_window

    config = get_preset("maverick-tiny")
    limits = build_limits(manifest_for("maverick-tiny", max_prefill=48, kv_cache="float32"))
    assert (limits.max_batch, limits.max_prefill) == (1, 48)
    assert limits.global_slots == default_window(config, 4)


@pytest.mark.parametrize("options, message", [
    ({"max_batch": 0}, "--max-batch 0: must be at least 1"),
    ({"max_prefill": 33}, "--max-prefill 33: must be between 1 and the exported prefill limit 32"),
    ({"window": 2}, "--window 2: the global KV window needs at least 5 slots"),
])
def test_bad_limits_are_refused_with_the_option_named(options, message):
    with pytest.raises(BuildError, match=message.replace("(", r"\(")):
        build_limits(manifest_for("scout-tiny"), **options)


def test_engine_manifest_records_versions_settings_and_hashes(tmp_path):
    for name, data in {"decode.onnx": b"d", "prefill.onnx": b"p", "model.data": b"w"}.items():
        (tmp_path / name).write_bytes(data)
    manifest = write_manifest(tmp_path, {**manifest_for("scout-tiny"), "external_data": "model.data"})
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine/decode.plan").write_bytes(b"plan-d")
    (tmp_path / "engine/prefill.plan").write_bytes(b"plan-p")
    cache = tmp_path / "engine/timing.cache"
    cache.write_bytes(b"cache")
    engines = {g: {"file": f"engine/{g}.plan", "graph": f"{g}.onnx", "profile": {}} for g in ("decode", "prefill")}
    settings = {"strongly_typed": True, "error_on_timing_cache_miss": False}
    written = write_engine_manifest(tmp_path, manifest, engines, settings, cache, None, "10.15.1",
                                    {"name": "NVIDIA H100", "compute_capability": "9.0"})
    assert json.loads((tmp_path / "manifest.json").read_text()) == written
    read_manifest(tmp_path)  # every hash, the plans' and the cache's included, verifies
    info = written["tensorrt"]
    assert info["version"] == "10.15.1" and info["gpu"]["compute_capability"] == "9.0"
    assert info["builder"] == settings
    assert info["outputs_sha256"] == {"engine/decode.plan": sha256_file(tmp_path / "engine/decode.plan"),
                                      "engine/prefill.plan": sha256_file(tmp_path / "engine/prefill.plan")}
    assert info["inputs_sha256"] == {n: sha256_file(tmp_path / n) for n in ("decode.onnx", "model.data", "prefill.onnx")}
    assert info["timing_cache"] == {"path": "engine/timing.cache", "inside_artifact": True, "sha256_in": None,
                                    "sha256_out": sha256_file(cache)}


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT and a GPU are here: the no-TensorRT path does not apply")
def test_without_tensorrt_plugin_registration_and_backend_fail_clearly(tmp_path):
    from llama4_export.tensorrt import moe_plugin
    from llama4_export.runtime import GenerationError
    from llama4_export.runtime.trt_backend import TrtBackend

    if "tensorrt" in TRT_MISSING.lower() and "not installed" in TRT_MISSING:
        with pytest.raises(ImportError):
            moe_plugin.register()
    with pytest.raises(GenerationError, match=f"--backend tensorrt: {TRT_MISSING}"):
        TrtBackend(tmp_path, {}, get_preset("scout-tiny"), 16)
    assert "tensorrt-cu12" in INSTALL_HINT and "https://pypi.nvidia.com" in INSTALL_HINT


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_plugin_body_matches_the_moe_reference(dtype):
    """What the plugin's impl runs (kernels.moe_forward via moe_compute) equals the fused op's numpy semantics."""
    import numpy as np
    import torch

    from llama4_export.tensorrt.moe_plugin import moe_compute
    from llama4_export.graph_passes.moe_reference import llama4_moe

    rng = np.random.default_rng(0)
    e, h, i, n = 4, 32, 16, 7
    arrays = {"x": rng.standard_normal((n, h)), "router": rng.standard_normal((e, h)),
              "gate_up": rng.standard_normal((e, h, 2 * i)) * 0.3, "down": rng.standard_normal((e, i, h)) * 0.3,
              "shared_gate": rng.standard_normal((i, h)) * 0.3, "shared_up": rng.standard_normal((i, h)) * 0.3,
              "shared_down": rng.standard_normal((h, i)) * 0.3}
    arrays = {k: v.astype(dtype) for k, v in arrays.items()}
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    out = torch.empty_like(tensors["x"])
    moe_compute(**tensors, out=out)
    reference = llama4_moe(**{k: v.astype(np.float64) for k, v in arrays.items()})
    error = np.abs(out.double().numpy() - reference).max() / np.abs(reference).max()
    assert error <= (1e-6 if dtype == "float32" else 2e-3)


def test_lint_refuses_an_artifact_lowered_for_onnxruntime(tmp_path):
    from typer.testing import CliRunner

    from llama4_export.cli.export import export_app

    (tmp_path / "decode.onnx").write_bytes(b"")
    write_manifest(tmp_path, {**manifest_for("scout-tiny"), "target": "onnxruntime"})
    result = CliRunner().invoke(export_app, ["lint", str(tmp_path)])
    assert result.exit_code == 2
    assert f"{tmp_path}: lowered for 'onnxruntime', not tensorrt; export it with --target tensorrt first" in \
        " ".join(result.output.split())


def test_an_empty_input_is_bound_at_a_non_null_address():
    """A text step of a multimodal prefill binds 0 image_features rows: TensorRT needs a non-null address for them."""
    import torch

    from llama4_export.runtime.trt_backend import tensor_address

    buffer = torch.zeros((2, 8), dtype=torch.float16)  # the backend's buffer holds at least one row
    assert buffer[:0].data_ptr() == 0  # what torch reports for the empty view
    assert tensor_address(buffer[:0]) == buffer.data_ptr()
    assert tensor_address(buffer[1:]) == buffer[1].data_ptr() == buffer.data_ptr() + 8 * buffer.element_size()
