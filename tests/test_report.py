"""The accuracy report against transformers: its reference perplexity equals Llama4ForCausalLM's on the same windows,
and its greedy agreement equals the first difference between transformers' greedy `generate` and the artifact's
own greedy generation (Generator, token by token through the decode graph). `llama4-export report`: the same report
of an artifact exported without one, the artifact left byte for byte as it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from typer.testing import CliRunner

from llama4_export import api
from llama4_export.calib.corpus import load_corpus
from llama4_export.cli.export import export_app
from llama4_export.evaluation.report import accuracy_report
from llama4_export.pipeline import QuantOptions
from llama4_export.runtime import Generator

from .conftest import make_hf_checkpoint

WINDOWS, SEQ_LEN, PROMPTS, NEW_TOKENS = 4, 64, 4, 16


@pytest.fixture(scope="module")
def int4_artifact(tmp_path_factory):
    """(checkpoint, artifact): a random transformers checkpoint with a character-level tokenizer.json (printable ASCII
    → its code point, so a text's ids are known without it), exported int4 (rtn) WITHOUT a report. Read-only."""
    root = tmp_path_factory.mktemp("report")
    checkpoint = make_hf_checkpoint(root / "ckpt", seed=3, dtype=torch.float32)
    tokenizer = Tokenizer(models.WordLevel({chr(c): c for c in range(32, 127)} | {"<unk>": 3}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tokenizer.save(str(checkpoint / "tokenizer.json"))
    out = root / "int4"
    api.export_model(out, checkpoint=checkpoint, precision="int4", target="onnxruntime", show_progress=False,
                     quant=QuantOptions(int4_algo="rtn", block_size=32, report=False))
    return checkpoint, out


def test_report_equals_transformers_and_the_artifacts_own_greedy_generation(int4_artifact):
    from transformers import Llama4ForCausalLM

    checkpoint, out = int4_artifact
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


def _snapshot(directory):
    """Every file under `directory` (relative path → sha256), and the names beside it."""
    files = {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(directory.rglob("*")) if p.is_file()}
    return files, sorted(p.name for p in directory.parent.iterdir())


def test_report_command_on_held_out_text_equals_transformers_and_leaves_the_artifact_as_it_was(int4_artifact, tmp_path):
    """`llama4-export report` on an artifact exported with --no-report, on a text of ours: the reference perplexity is
    Llama4ForCausalLM's on that text's ids (one window: the text is shorter than the report's 256 tokens), the table is
    printed, the JSON written to --out names the text, and not one byte of the artifact changed."""
    from transformers import Llama4ForCausalLM

    checkpoint, out = int4_artifact
    assert not (out / "report.json").exists()
    text = "".join(chr(c) for c in np.random.default_rng(5).integers(32, 127, 192))
    held_out = tmp_path / "mine.txt"
    held_out.write_text(text, encoding="ascii")
    before = _snapshot(out)
    result = CliRunner().invoke(export_app, ["report", str(out), "--checkpoint", str(checkpoint), "--eval-data",
                                             str(held_out), "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert _snapshot(out) == before
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["eval_data"] == "mine.txt" and report["eval_data_sha256"] == load_corpus(held_out).sha256
    assert (report["windows"], report["seq_len"], report["tokens"]) == (1, 192, 191)
    table = " ".join(result.stdout.split())
    assert "accuracy vs the fp32 model: 1 × 192 tokens of mine.txt" in table
    assert f"perplexity_reference │ {report['perplexity_reference']:.4f}" in table

    model = Llama4ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([[ord(c) for c in text]])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits[:, :-1].double(), -1)
    nll = -log_probs.gather(-1, ids[:, 1:, None]).mean()
    assert report["perplexity_reference"] == pytest.approx(float(torch.exp(nll)), rel=1e-5)
    assert 0 < report["kl_mean"] and report["top1_agreement"] < 1  # int4 against fp32: the artifact's side is its own


def test_report_command_defaults_to_exports_held_out_text(int4_artifact):
    """Without --eval-data: the text export reports on (the embedded corpus's held-out slice), as JSON on stdout."""
    checkpoint, out = int4_artifact
    result = CliRunner().invoke(export_app, ["report", str(out), "-c", str(checkpoint), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["eval_data"] == "embedded:heldout" and (report["windows"], report["seq_len"]) == (8, 256)
    assert set(report) >= {"perplexity_reference", "perplexity_quantized", "perplexity_ratio", "kl_mean",
                           "top1_agreement", "greedy_agreement_tokens"}


def test_report_command_refuses_bad_input_in_one_line(int4_artifact, tmp_path):
    """A changed checkpoint file or tokenizer, no checkpoint, a checkpoint given as the artifact, unreadable held-out
    text, --out inside the artifact: one line each, exit 2, before any report runs, and the artifact unchanged."""
    checkpoint, out = int4_artifact
    moved = tmp_path / "moved"
    shutil.copytree(checkpoint, moved)
    weights = moved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    retokenized = tmp_path / "retokenized"
    shutil.copytree(checkpoint, retokenized)
    (retokenized / "tokenizer.json").write_text((checkpoint / "tokenizer.json").read_text().replace('"<unk>"', '"<UNK>"'))
    fifo = tmp_path / "held-out.fifo"
    os.mkfifo(fifo)
    before = _snapshot(out)
    cases = {
        ("-c", str(moved)): f"{weights}: missing or not the file the artifact was exported from (sha256 differs)",
        ("-c", str(retokenized)): f"{retokenized / 'tokenizer.json'}: missing or not the file the artifact was exported",
        (): "the artifact was exported from checkpoint 'ckpt'; pass its directory with --checkpoint",
        ("-c", str(checkpoint), "--eval-data", str(tmp_path / "absent.txt")): f"{tmp_path / 'absent.txt'}: no such file",
        ("-c", str(checkpoint), "--out", str(out / "report.json")): f"--out {out / 'report.json'}: inside the artifact",
        # a pipe (`--eval-data <(zcat held-out.txt.gz)`, /dev/stdin) exists: it was "no such file or directory"
        ("-c", str(checkpoint), "--eval-data", str(fifo)): f"{fifo}: not a regular file (a pipe or a device); save the",
    }
    for args, expected in cases.items():
        result = CliRunner().invoke(export_app, ["report", str(out), *args])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], (args, result.output)
    result = CliRunner().invoke(export_app, ["report", str(checkpoint)])
    assert result.exit_code == 2 and "a Hugging Face checkpoint (config.json, no manifest.json)" in result.output
    assert _snapshot(out) == before
