"""The acceptance check: l4-scoutlike exported at fp32, generated on ONNX Runtime through the sliding cache, equals
transformers' own `generate` token for token; plus prefill pieces, batches and a window smaller than the sequence."""

from __future__ import annotations

import json

import pytest
import torch

from llama4_export import api
from llama4_export.runtime import Generator, OrtBackend
from llama4_export.evaluation.torch_backend import TorchBackend

NEW_TOKENS = 64


@pytest.fixture(scope="module")
def artifact(scoutlike_artifact):
    manifest = json.loads((scoutlike_artifact / "manifest.json").read_text())
    assert manifest["precision"] == "fp32"
    return scoutlike_artifact


@pytest.fixture(scope="module")
def ort_generator(artifact):
    return Generator.load(artifact, backend="onnxruntime", threads=2)


@pytest.fixture(scope="module")
def prompt(ort_generator, heldout_text):
    """~100 tokens of held-out prose: with 64 new tokens the sequence crosses the 64-token chunk boundary twice."""
    ids = ort_generator.encode(heldout_text[:3000])[:100]
    assert len(ids) == 100 and ids[0] == 1021
    return ids


@pytest.fixture(scope="module")
def hf_tokens(scoutlike_dir, prompt):
    from transformers import Llama4ForCausalLM

    model = Llama4ForCausalLM.from_pretrained(scoutlike_dir, dtype=torch.float32).eval()
    assert model.generation_config.eos_token_id == 1022 and not model.generation_config.do_sample
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(prompt):].tolist()  # stops after eos 1022 like ours, if it comes


def test_ort_greedy_equals_transformers_generate(ort_generator, prompt, hf_tokens):
    result = ort_generator.generate(prompt, max_new_tokens=NEW_TOKENS)  # default stop tokens: eos 1022, as HF
    assert result.token_ids == hf_tokens
    assert len(hf_tokens) == NEW_TOKENS and result.stop_reason == "length"  # no early eos: all 64 compared
    assert 100 + NEW_TOKENS > 2 * 64


@pytest.fixture(scope="module")
def optimized_artifact(tmp_path_factory, scoutlike_dir):
    """The same checkpoint through the default graph passes (the other tests here run the traced graphs)."""
    out = tmp_path_factory.mktemp("optimized") / "scoutlike"
    api.export_model(out, checkpoint=scoutlike_dir, show_progress=False, quant=api.QuantOptions(report=False))
    return out


def test_ort_optimized_graphs_equal_transformers_generate(optimized_artifact, prompt, hf_tokens):
    """With the global layer's one-row decode regrouped (group_decode_queries): the 100-token prompt leaves its growing
    buffer 128 slots long, so the decode steps at 125..127 write their scratch copies past the end unless the cache
    keeps room for them."""
    passes = json.loads((optimized_artifact / "passes.json").read_text())
    for graph in ("decode", "prefill"):
        assert [r["rewrites"] for r in passes[graph]["passes"] if r["pass"] == "group_decode_queries"] == [1]
    result = Generator.load(optimized_artifact, threads=2).generate(prompt, max_new_tokens=NEW_TOKENS)
    assert result.token_ids == hf_tokens


def test_ort_prompt_fed_in_prefill_pieces(artifact, prompt, hf_tokens):
    """A prefill limit of 24 feeds the 100-token prompt as 24+24+24+24+4, crossing a chunk boundary mid-prompt."""
    gen = Generator.load(artifact, threads=2, max_prefill_tokens=24)
    assert isinstance(gen.backend, OrtBackend) and gen.backend.max_prefill_tokens == 24
    assert gen.generate(prompt, max_new_tokens=NEW_TOKENS).token_ids == hf_tokens


def test_ort_batch_of_different_lengths_equals_single_runs(ort_generator, prompt):
    prompts = [prompt[:7], prompt, prompt[:40]]
    alone = [ort_generator.generate(p, max_new_tokens=20, stop_tokens=[]).token_ids for p in prompts]
    together = ort_generator.generate_batch(prompts, max_new_tokens=20, stop_tokens=[])
    assert [r.token_ids for r in together] == alone


def test_ort_window_smaller_than_sequence(artifact, prompt, hf_tokens):
    """W = 120: tokens at positions <= W equal transformers; past W generation goes on, as the torch reference does."""
    window, sinks = 120, 4
    ort = Generator.load(artifact, window=window, sinks=sinks, threads=2)
    tokens = ort.generate(prompt, max_new_tokens=NEW_TOKENS).token_ids
    assert len(tokens) == NEW_TOKENS
    exact = window - len(prompt) + 1
    assert tokens[:exact] == hf_tokens[:exact]
    reference = Generator(TorchBackend.from_onnx_weights(artifact / "decode.onnx", ort.config), window=window, sinks=sinks)
    assert tokens == reference.generate(prompt, max_new_tokens=NEW_TOKENS).token_ids
    assert tokens != hf_tokens  # the window really dropped tokens


class _Recorded:
    """The artifact's real backend, with the shape of every step's logits written down."""

    def __init__(self, backend):
        self.backend, self.logits = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def forward(self, input_ids, positions, cache, logits_index=None):
        out = self.backend.forward(input_ids, positions, cache, logits_index)
        self.logits.append((input_ids.shape, out.shape))
        return out


def test_generation_prefill_computes_only_the_logits_it_needs(artifact, prompt):
    """Prompt pieces of 32 tokens in a batch of two rows: each prefill step returns one column of logits per row (each
    row's last token in the piece), not 32; the tokens are those of the unsplit generation."""
    expected = Generator.load(artifact).generate_batch([prompt, prompt[:41]], max_new_tokens=4, stop_tokens=[])
    generator = Generator.load(artifact, max_prefill_tokens=32)
    generator.backend = recorded = _Recorded(generator.backend)
    got = generator.generate_batch([prompt, prompt[:41]], max_new_tokens=4, stop_tokens=[])
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    prefill = [(ids, logits) for ids, logits in recorded.logits if ids[1] > 1]
    assert len(prefill) == 4 and all(logits[:2] == (2, 1) for _, logits in prefill), recorded.logits
