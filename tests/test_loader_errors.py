"""Bad checkpoints: one exception type, a one-line message naming the file/tensor, exit 2 and no traceback on the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from llama4_export import CheckpointError
from llama4_export.cli.export import export_app
from llama4_export.model import get_preset
from llama4_export.weights import load

from .conftest import make_hf_checkpoint

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    # Sharded like real checkpoints: several files plus an index.
    return make_hf_checkpoint(tmp_path_factory.mktemp("good") / "ckpt", max_shard_size="100KB")


@pytest.fixture()
def ckpt(good_checkpoint, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(good_checkpoint, tmp_path / "ckpt"))


def shard_of(ckpt: Path, tensor: str) -> Path:
    return ckpt / json.loads((ckpt / INDEX).read_text())["weight_map"][tensor]


def rewrite_shard(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def break_missing_dir(ckpt: Path) -> tuple[Path, str]:
    return ckpt / "nope", "nope: checkpoint directory not found"


def break_config_file_given(ckpt: Path) -> tuple[Path, str]:  # was "checkpoint directory not found"
    return ckpt / "config.json", "config.json: is a file, not a checkpoint directory"


def break_missing_config(ckpt: Path) -> tuple[Path, str]:
    (ckpt / "config.json").unlink()
    return ckpt, "config.json: config.json not found"


def break_missing_shard(ckpt: Path) -> tuple[Path, str]:
    shard = shard_of(ckpt, "lm_head.weight")
    shard.unlink()
    return ckpt, f"{shard.name}: shard listed in {INDEX} is missing"


def break_truncated_shard(ckpt: Path) -> tuple[Path, str]:
    shard = shard_of(ckpt, "lm_head.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return ckpt, f"{shard.name}: not a readable safetensors file"


def break_wrong_shape(ckpt: Path) -> tuple[Path, str]:
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_shard(shard_of(ckpt, name), lambda t: t.__setitem__(name, t[name][:-1].clone()))
    return ckpt, f"tensor '{name}' has shape"


def break_missing_tensor(ckpt: Path) -> tuple[Path, str]:
    name = "model.layers.2.feed_forward.experts.down_proj"
    rewrite_shard(shard_of(ckpt, name), lambda t: t.pop(name))
    index = json.loads((ckpt / INDEX).read_text())
    del index["weight_map"][name]
    (ckpt / INDEX).write_text(json.dumps(index))
    return ckpt, f"tensor '{name}' is missing from the checkpoint"


def break_unexpected_tensor(ckpt: Path) -> tuple[Path, str]:
    name = "model.layers.0.self_attn.q_norm.weight"
    shard = shard_of(ckpt, "lm_head.weight")
    rewrite_shard(shard, lambda t: t.__setitem__(name, torch.ones(16, dtype=torch.bfloat16)))
    index = json.loads((ckpt / INDEX).read_text())
    index["weight_map"][name] = shard.name
    (ckpt / INDEX).write_text(json.dumps(index))
    return ckpt, f"unexpected tensor '{name}'"


def break_pickle_only(ckpt: Path) -> tuple[Path, str]:
    for p in ckpt.glob("*.safetensors*"):
        p.unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    return ckpt, "pickled weights are never loaded"


def break_bad_json(ckpt: Path) -> tuple[Path, str]:
    (ckpt / "config.json").write_text("{not json")
    return ckpt, "config.json: not valid JSON"


def break_zero_heads(ckpt: Path) -> tuple[Path, str]:  # a ZeroDivisionError traceback (hidden // heads)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "num_attention_heads": 0}))
    return ckpt, "config.json: num_attention_heads=0: must be >= 1; fix the value or re-save the config"


def break_zero_chunk(ckpt: Path) -> tuple[Path, str]:  # exported; llama4rt then divided by it (SIGFPE)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "attention_chunk_size": 0}))
    return ckpt, "config.json: attention_chunk_size=0: must be >= 1"


def _edit_index(ckpt: Path, edit) -> None:
    index = json.loads((ckpt / INDEX).read_text())
    edit(index)
    (ckpt / INDEX).write_text(json.dumps(index))


def break_index_weight_map_null(ckpt: Path) -> tuple[Path, str]:  # an AttributeError traceback
    _edit_index(ckpt, lambda index: index.__setitem__("weight_map", None))
    return ckpt, f"{INDEX}: weight_map must be an object of tensor name → shard file name"


def break_index_shard_not_a_name(ckpt: Path) -> tuple[Path, str]:  # a TypeError traceback (Path / int)
    _edit_index(ckpt, lambda index: index["weight_map"].__setitem__("lm_head.weight", 5))
    return ckpt, f"{INDEX}: weight_map must be an object of tensor name → shard file name"


def break_index_shard_outside(ckpt: Path) -> tuple[Path, str]:  # was opened wherever it pointed
    _edit_index(ckpt, lambda index: index["weight_map"].__setitem__("lm_head.weight", "../elsewhere.safetensors"))
    return ckpt, f"{INDEX}: shard '../elsewhere.safetensors' is outside the checkpoint directory"


def break_tensor_in_two_shards(ckpt: Path) -> tuple[Path, str]:  # "not in this shard", of the shard holding it
    """A shard from another save holding a tensor the index places elsewhere (transformers loads the last shard's)."""
    name = "model.embed_tokens.weight"
    listed, last = shard_of(ckpt, name), shard_of(ckpt, "lm_head.weight")
    assert listed.name < last.name
    rewrite_shard(last, lambda t: t.__setitem__(name, torch.zeros_like(load_file(listed)[name])))
    return ckpt, f"{last.name}: tensor '{name}' is also in {listed.name}; a tensor is in one shard only"

def _edit_config(ckpt: Path, **fields) -> Path:
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, **fields}))
    return ckpt


def break_tie_as_a_string(ckpt: Path) -> tuple[Path, str]:  # "false" was taken as tied: lm_head left out
    return _edit_config(ckpt, tie_word_embeddings="false"), 'tie_word_embeddings="false": must be true or false'


def break_moe_layer_twice(ckpt: Path) -> tuple[Path, str]:  # accepted silently
    return _edit_config(ckpt, moe_layers=[0, 0]), "moe_layers [0, 0] names a layer twice"


def break_no_rope_layer_not_a_flag(ckpt: Path) -> tuple[Path, str]:  # accepted silently
    layers = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]
    return _edit_config(ckpt, no_rope_layers=[2] * layers), "each entry is 1 (RoPE) or 0 (NoPE)"


def break_fp8_release(ckpt: Path) -> tuple[Path, str]:  # "unexpected tensor '..._scale'", naming no way out
    """As Meta's -FP8 releases: fbgemm_fp8 in config.json, float8_e4m3fn experts with per-row float32 `*_scale`s."""
    name = "model.layers.0.feed_forward.experts.gate_up_proj"

    def quantize(tensors):
        weight = tensors[name].float()
        scale = weight.abs().amax(dim=1, keepdim=True) / torch.finfo(torch.float8_e4m3fn).max
        tensors[name], tensors[f"{name}_scale"] = (weight / scale).to(torch.float8_e4m3fn), scale
    shard = shard_of(ckpt, name)
    rewrite_shard(shard, quantize)
    _edit_index(ckpt, lambda index: index["weight_map"].__setitem__(f"{name}_scale", shard.name))
    _edit_config(ckpt, quantization_config={"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0})
    return ckpt, ("config.json: quantization_config (quant_method 'fbgemm_fp8'): a pre-quantized checkpoint; export "
                  "from the unquantized (bf16) release")

def break_fp8_without_quantization_config(ckpt: Path) -> tuple[Path, str]:  # "unexpected tensor '..._scale'"
    """An -FP8 release whose config.json lost its quantization_config (edited, or swapped for the bf16 release's)."""
    path, _ = break_fp8_release(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    del config["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(config))
    return path, ("tensor 'model.layers.0.feed_forward.experts.gate_up_proj_scale' is an FP8 weight's scale: the "
                  "checkpoint has FP8 weights but its config.json has no quantization_config; pre-quantized "
                  "checkpoints are not read: export from the unquantized (bf16) release")


def break_fp8_weight_without_scale(ckpt: Path) -> tuple[Path, str]:  # "is stored as F8_E4M3; supported: BF16, F16, F32"
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_shard(shard_of(ckpt, name), lambda t: t.__setitem__(name, t[name].to(torch.float8_e4m3fn)))
    return ckpt, (f"tensor '{name}' is stored as F8_E4M3: the checkpoint has FP8 weights but its config.json has no "
                  "quantization_config")

BREAKERS = [
    break_missing_dir, break_config_file_given, break_missing_config, break_missing_shard, break_truncated_shard, break_wrong_shape,
    break_missing_tensor, break_unexpected_tensor, break_pickle_only, break_bad_json, break_zero_heads, break_zero_chunk,
    break_index_weight_map_null, break_index_shard_not_a_name, break_index_shard_outside, break_tensor_in_two_shards,
    break_tie_as_a_string, break_moe_layer_twice, break_no_rope_layer_not_a_flag, break_fp8_release,
    break_fp8_without_quantization_config, break_fp8_weight_without_scale,
]


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__.removeprefix("break_"))
def test_load_raises_one_clear_error(ckpt, breaker):
    path, expected = breaker(ckpt)
    with pytest.raises(CheckpointError) as info:
        load(path)
    message = str(info.value)
    assert expected in message and "\n" not in message


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__.removeprefix("break_"))
def test_cli_prints_one_line_and_exits_2(ckpt, breaker):
    path, expected = breaker(ckpt)
    result = CliRunner().invoke(export_app, ["inspect", "--checkpoint", str(path)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_unknown_preset_from_the_console_script():
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "llama4-export"), "inspect", "--model", "llama5"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown preset 'llama5'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, expected", [
    (["llama4-export", "--partitions", "1.5"], "Invalid value for '--partitions'"),
    (["llama4-export", "inspect", "--bogus"], "No such option: --bogus; see llama4-export inspect --help"),
    (["llama4-run"], "Missing argument 'directory'; see llama4-run --help"),
    (["llama4-serve", "--port", "http", "."], "Invalid value for '--port'"),
])
def test_a_usage_error_from_the_console_scripts_is_one_line_and_exit_2(argv, expected):
    """Typer printed a usage error as usage lines, a hint and a boxed message; ours are one line like every error."""
    proc = subprocess.run([str(Path(sys.executable).parent / argv[0]), *argv[1:]], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_good_checkpoint_still_loads(good_checkpoint):
    model = load(good_checkpoint)
    assert model.config.num_hidden_layers == 4


def test_config_values_of_the_wrong_type_are_named(ckpt):
    """256.5 and "256" were taken as 256 and true as 1 layer; "abc" and "all" were "malformed field (invalid literal
    for int() with base 10: 'a')", naming no field; −1 layers said "moe_layers [0..5] names layers outside 0..-2"; token
    ids likewise."""
    config = json.loads((ckpt / "config.json").read_text())
    for key, value, message in (
            ("hidden_size", 256.5, "hidden_size=256.5: must be an integer"),
            ("hidden_size", "abc", 'hidden_size="abc": must be an integer'),
            ("num_hidden_layers", True, "num_hidden_layers=true: must be an integer"),
            ("num_hidden_layers", -1, "num_hidden_layers=-1: must be >= 1"),
            ("moe_layers", "all", 'moe_layers="all": must be a list of integers'),
            # true and 2.5 were taken as eos ids 1 and 2 (the runtimes then stopped on token 1); "x" named no field
            ("eos_token_id", True, "eos_token_id=true: must be a token id or a list of token ids"),
            ("eos_token_id", [2, 2.5], "eos_token_id=[2, 2.5]: must be a token id or a list of token ids"),
            ("eos_token_id", [2, "x"], 'eos_token_id=[2, "x"]: must be a token id or a list of token ids'),
            ("bos_token_id", "1", 'bos_token_id="1": must be a token id')):
        (ckpt / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(CheckpointError, match=r"^" + re.escape(f"{ckpt / 'config.json'}: {message}; fix the value")):
            load(ckpt)


def test_an_artifact_is_inspected_by_its_manifest_and_named_where_a_checkpoint_is_needed(tmp_path):
    """`inspect --checkpoint ARTIFACT` said "config.json not found; a Hugging Face checkpoint directory needs one": it
    now summarizes the model the manifest records (here one layer of scout-tiny: as the preset cut to one layer);
    plan and export, which need the checkpoint (or a preset) and a precision, name the artifact as one."""
    from llama4_export import api
    from llama4_export.model.summary import summarize

    artifact = tmp_path / "art"
    api.export_model(artifact, model="scout-tiny", layers=1, random_weights=True, optimize=False, show_progress=False,
                     quant=api.QuantOptions(report=False))
    inspected = CliRunner().invoke(export_app, ["inspect", "--checkpoint", str(artifact), "--json"])
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.stdout) == {**summarize(get_preset("scout-tiny", layers=1)), "name": "art"}
    planned = CliRunner().invoke(export_app, ["plan", "--checkpoint", str(artifact), "--gpu", "h100-80gb"])
    assert planned.exit_code == 2 and planned.stderr.strip() == f"error: {artifact}: an exported artifact; plan plans " \
        "a deployment from its checkpoint (or --model PRESET) and a precision, and the runtime sizes an artifact's " \
        "window on the GPU it runs on by itself", planned.stderr
    exported = CliRunner().invoke(export_app, ["--checkpoint", str(artifact), "--out", str(tmp_path / "again")])
    lines = [line for line in exported.stderr.splitlines() if line.strip()]
    assert exported.exit_code == 2 and lines == [f"error: {artifact}: an exported artifact (manifest.json), not a "
                                                 "Hugging Face checkpoint; give the checkpoint it was exported from (or "
                                                 "--model PRESET for a preset's)"], exported.stderr


def test_a_nan_weight_is_refused_where_the_weights_are_read(ckpt, tmp_path):
    """One NaN in o_proj exported with exit 0 and the artifact generated token 0 over and over (inspect reads no
    weights, so this is the loader's and the export's)."""
    name = "model.layers.1.self_attn.o_proj.weight"

    def poison(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name][3, 5] = float("nan")
    rewrite_shard(shard_of(ckpt, name), poison)
    message = f"tensor '{name}' holds NaN or infinite values; the shard is damaged (re-download it)"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load(ckpt)
    result = CliRunner().invoke(export_app, ["--checkpoint", str(ckpt), "--no-report", "--out", str(tmp_path / "o")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "o").exists()


def test_a_weight_past_float16s_range_is_refused_at_fp16(ckpt, tmp_path):
    """A finite bf16 weight beyond ±65504 became inf in the fp16 artifact: exit 0, and it generated token 0 over and
    over (its logits NaN)."""
    name = "model.layers.1.self_attn.o_proj.weight"

    def enlarge(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name][3, 5] = 1e5
    rewrite_shard(shard_of(ckpt, name), enlarge)
    assert not torch.isfinite(load_file(shard_of(ckpt, name))[name].to(torch.float16)).all()  # torch's own cast
    result = CliRunner().invoke(export_app, ["--checkpoint", str(ckpt), "--precision", "fp16", "--no-report",
                                             "--out", str(tmp_path / "o")])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]  # after the progress lines
    message = f"tensor '{name}' holds values beyond float16's range (±65504); export it at --precision bf16 or fp32"
    assert result.exit_code == 2 and len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
