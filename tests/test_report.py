"""The accuracy report against transformers: its reference perplexity equals Llama4ForCausalLM's on the same windows,
and its greedy agreement equals the first difference between transformers' greedy `generate` and the artifact's
own greedy generation (Generator, token by token through the decode graph)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llama4_export import api
from llama4_export.evaluation.report import accuracy_report
from llama4_export.pipeline import QuantOptions
from llama4_export.runtime import Generator

from .conftest import make_hf_checkpoint

WINDOWS, SEQ_LEN, PROMPTS, NEW_TOKENS = 4, 64, 4, 16


def test_report_equals_transformers_and_the_artifacts_own_greedy_generation(tmp_path):
    from transformers import Llama4ForCausalLM

    checkpoint = make_hf_checkpoint(tmp_path / "ckpt", seed=3, dtype=torch.float32)
    out = tmp_path / "int4"
    api.export_model(out, checkpoint=checkpoint, precision="int4", target="onnxruntime", show_progress=False,
                     quant=QuantOptions(int4_algo="rtn", block_size=32, report=False))
    tokens = np.random.default_rng(0).integers(3, 128, WINDOWS * SEQ_LEN)  # exactly the windows: back to back
    report = accuracy_report(out, api.weight_source(checkpoint=checkpoint), tokens, "random ids", windows=WINDOWS,
                             seq_len=SEQ_LEN, greedy_prompts=PROMPTS, greedy_tokens=NEW_TOKENS)

    model = Llama4ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.from_numpy(tokens.reshape(WINDOWS, SEQ_LEN))
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits[:, :-1].double(), -1)
    nll = -log_probs.gather(-1, ids[:, 1:, None]).mean()
    assert report["perplexity_reference"] == pytest.approx(float(torch.exp(nll)), rel=1e-5)

    prompts = ids[:PROMPTS, : SEQ_LEN // 2]
    model.generation_config.eos_token_id = None  # greedy through eos too, as the report's continuations go on
    with torch.no_grad():
        theirs = model.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=0)[:, prompts.shape[1]:].tolist()
    generator = Generator.load(out)
    ours = [generator.generate(row.tolist(), max_new_tokens=NEW_TOKENS, stop_tokens=[]).token_ids for row in prompts]
    lengths = [next((i for i, (a, b) in enumerate(zip(t, o)) if a != b), NEW_TOKENS) for t, o in zip(theirs, ours)]
    assert min(lengths) < NEW_TOKENS  # int4 on random weights diverges somewhere: the count is exercised
    assert report["greedy_agreement_tokens"] == pytest.approx(np.mean(lengths)), (lengths, theirs, ours)


def test_an_artifact_taking_one_token_per_prefill_still_gets_its_report(tmp_path):
    """--max-prefill 1 capped the report's windows at one token: its greedy prompts were empty and the export ended in
    an IndexError traceback after writing everything."""
    result = api.export_model(tmp_path / "one", model="scout-tiny", layers=1, random_weights=True, max_prefill=1,
                              show_progress=False)
    report = result.accuracy_report
    assert report["seq_len"] == 2 and report["tokens"] == report["windows"] > 0
    assert report["perplexity_ratio"] == pytest.approx(1.0, abs=1e-4)  # fp32: the artifact is the reference
