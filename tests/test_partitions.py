"""--partitions N (export/partitions.py + runtime/partitioned.py): contiguous layer ranges, each its own graphs and
KV-cache inputs, chained through hidden states by the runtime; same greedy tokens as the PyTorch reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from llama4_export.cli import export_app
from llama4_export.export import ModelSource, io_spec
from llama4_export.export.partitions import HIDDEN_IN, HIDDEN_OUT, export_partitioned
from llama4_export.export.streaming import preset_config
from llama4_export.model.loader import from_config
from llama4_export.runtime import Generator, TorchBackend


@pytest.fixture(scope="module")
def model():
    # maverick-tiny's first 4 layers: dense and MoE layers, chunked and global (NoPE layer 3) attention
    return from_config(preset_config("maverick-tiny", 4), seed=5)


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory, model):
    out = tmp_path_factory.mktemp("partitions") / "p2"
    export_partitioned(out, ModelSource(preset="maverick-tiny", seed=5), 2, target="onnxruntime", show_progress=False, model=model)
    return out


def test_parts_hold_their_own_layers_and_chain_hidden_states(partitioned):
    manifest = Generator.load(partitioned).backend.parts
    assert [list(layers) for layers, _, _ in manifest] == [[0, 1], [2, 3]]
    first = onnx.load(str(partitioned / "part0" / "decode.onnx"), load_external_data=False).graph
    second = onnx.load(str(partitioned / "part1" / "decode.onnx"), load_external_data=False).graph
    assert [i.name for i in first.input][:1] == [io_spec.INPUT_IDS] and [o.name for o in first.output][0] == HIDDEN_OUT
    assert [i.name for i in second.input][:1] == [HIDDEN_IN] and [o.name for o in second.output][0] == io_spec.LOGITS
    assert {i.name for i in second.input if i.name.startswith("past_key")} == {"past_key.2", "past_key.3"}
    weights = {i.name for i in second.initializer}
    assert not any(name.startswith("model.layers.0.") for name in weights) and "lm_head.weight" in weights


def test_partitioned_greedy_tokens_equal_the_pytorch_model(partitioned, model):
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, 256, 21)]  # crosses the 16-token chunk
    parts = Generator.load(partitioned, window=64)
    reference = Generator(TorchBackend(model), window=64)
    got = parts.generate(prompt, max_new_tokens=24, stop_tokens=[]).token_ids
    assert got == reference.generate(prompt, max_new_tokens=24, stop_tokens=[]).token_ids


def test_partitions_refuse_quantized_precisions(tmp_path):
    result = CliRunner().invoke(export_app, ["--model", "maverick-tiny", "--partitions", "2", "--precision", "int4",
                                             "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--partitions N supports fp32 / fp16" in result.output
