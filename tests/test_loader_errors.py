"""Bad checkpoints: one exception type, a one-line message naming the file/tensor, exit 2 and no traceback on the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from llama4_export import CheckpointError
from llama4_export.cli.export import export_app
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


BREAKERS = [
    break_missing_dir, break_missing_config, break_missing_shard, break_truncated_shard, break_wrong_shape,
    break_missing_tensor, break_unexpected_tensor, break_pickle_only, break_bad_json,
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


def test_good_checkpoint_still_loads(good_checkpoint):
    model = load(good_checkpoint)
    assert model.config.num_hidden_layers == 4
