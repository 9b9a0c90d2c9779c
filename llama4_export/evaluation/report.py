"""Accuracy report: an artifact on ONNX Runtime vs the fp32 PyTorch model of its weight source, on held-out text.

Windows of the held-out token stream go through the artifact's prefill graph(s) (logits for every position; a graph
lowered for TensorRT runs with its plugin nodes served by the numpy reference, a bf16 graph widened to fp32) and
through the source's fp32 model, run one decoder layer at a time (calib/layerwise.py: one layer's weights in memory,
one routed expert at a time, lm_head applied slice by slice — the reference of a full-size model fits where the
artifact does). Reported: perplexity of both and their ratio, mean KL(reference ‖ artifact) of the next-token
distributions, top-1 agreement, and the greedy-continuation agreement length (tokens generated greedily from a
prompt until the two first differ, averaged over prompts, capped at `greedy_tokens`). Where no tokenizer can be had,
the windows are seeded random token ids: the perplexities then mean nothing, the agreement figures still do.
Every figure is rounded to REPORT_DIGITS significant digits: ONNX Runtime's and numpy's kernels differ in the last
bits between CPUs with other vector units, and report.json is one of the files a rebuild compares.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from ..artifact import MANIFEST, held_directory, read_manifest
from ..calib.calibrate import tokenizer_for
from ..calib.corpus import CalibrationError, cut_samples, load_corpus, token_stream
from ..calib.layerwise import LayerRunner, embed
from ..graph_passes.verify import executable_copy
from ..model.config import Llama4Config
from ..model.io_spec import DEFAULT_SINKS
from ..runtime.ort_backend import OrtBackend, PartGraphs, artifact_parts
from ..weights import WeightSource

REPORT_FILE = "report.json"
RANDOM_TOKENS = "random token ids (no tokenizer)"
REPORT_DIGITS = 6
MIN_EVAL_TOKENS = 16  # fewer say nothing of the model (under 2 there is no next token to predict at all)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def evaluation_tokens(source: WeightSource, eval_data: str | Path | None) -> tuple[np.ndarray, str, str | None]:
    """The held-out token stream, what it is and its text's sha256: `eval_data` (default: the embedded corpus's
    held-out slice) through the source's tokenizer — or, when there is no tokenizer and no text was asked for, seeded
    random ids (no text). A file is named by its name alone, as the calibration text is: no path in an artifact."""
    try:
        tokenizer = tokenizer_for(source, source.config, f"the accuracy report tokenizes --eval-data {eval_data}; add the "
                                  "checkpoint's tokenizer.json, or leave --eval-data out (the report then runs on "
                                  "seeded random token ids)")
    except CalibrationError:
        if eval_data is not None:
            raise
        return np.random.default_rng(0).integers(0, source.config.vocab_size, 8 * 256), RANDOM_TOKENS, None
    text = load_corpus(eval_data, "heldout")
    tokens = token_stream(text, tokenizer)
    if len(tokens) < MIN_EVAL_TOKENS:  # checked before the export: the report comes at its end
        raise CalibrationError(f"--eval-data {eval_data}: {len(tokens)} token(s), and the report predicts each next "
                               f"token of windows of the text: give at least {MIN_EVAL_TOKENS} tokens of text")
    return tokens, text.recorded_name, text.sha256


class ReferenceLogits:
    """The source's fp32 model, one layer in memory at a time; lm_head read slice by slice."""

    def __init__(self, source: WeightSource):
        self.source = source

    @torch.no_grad()
    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """Logits [rows, T, V] of every row of ids [rows, T] from position 0."""
        runner = LayerRunner(self.source, ids.shape[1])
        states = embed(self.source, ids)
        for i in range(self.source.config.num_hidden_layers):
            runner.run(i, states).to("meta")
        hidden = torch.cat(runner.final_norm(states))  # [rows, T, H]
        logits = torch.empty(*hidden.shape[:-1], self.source.config.vocab_size)
        first = 0
        for piece in self.source.chunks("lm_head.weight", torch.float32):
            logits[..., first:first + piece.shape[0]] = hidden @ piece.T
            first += piece.shape[0]
        return logits.numpy()


class ArtifactLogits:
    """An artifact's prefill graph(s) on ONNX Runtime, all positions' logits for a row of token ids."""

    def __init__(self, artifact: Path, scratch: Path):
        manifest = read_manifest(artifact, verify=False)
        config = Llama4Config.from_manifest(manifest, str(artifact / MANIFEST))
        parts, max_prefill = artifact_parts(artifact, manifest, config)
        runnable, library = [], None
        for k, part in enumerate(parts):
            original = ir.load(part.prefill)
            model, needs = executable_copy(original)
            path = part.prefill
            if model is not original:  # plugin nodes served by the reference, or bf16 widened: run a copy
                path = scratch / f"part{k}.onnx"
                ir.save(model, path, external_data=f"part{k}.data")
                library = needs or library
            runnable.append(PartGraphs(part.layers, path, path))
        self.backend = OrtBackend(runnable, config, max_prefill, custom_op_library=library)
        self.cache = self.backend.make_cache(1, None, DEFAULT_SINKS)
        self.max_prefill = max_prefill

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        positions = np.arange(len(ids), dtype=np.int64)[None]
        self.cache.reset()
        return self.backend.forward(ids[None].astype(np.int64), positions, self.cache)[0]


def accuracy_report(artifact: str | Path, source: WeightSource, tokens: np.ndarray, data: str,
                    data_sha256: str | None = None, windows: int = 8, seq_len: int = 256, greedy_prompts: int = 4,
                    greedy_tokens: int = 16, scratch_in: Path | None = None) -> dict:
    """The report dict (see the module docstring) on held-out `tokens`, `data` with text of `data_sha256`
    (evaluation_tokens). scratch_in: where the runnable copies of the graphs go (default: beside the artifact)."""
    seq_len = min(seq_len, len(tokens))
    with held_directory(Path(artifact).parent if scratch_in is None else scratch_in, ".report-") as scratch:
        artifact_logits = ArtifactLogits(Path(artifact), scratch)
        seq_len = max(2, min(seq_len, artifact_logits.max_prefill))  # --max-prefill 1: two-token windows still
        ids = cut_samples(tokens, windows, seq_len, data)[:, :seq_len]
        reference = ReferenceLogits(source)
        nll_ref, nll_q, kl, agree, count = 0.0, 0.0, 0.0, 0, 0
        for row, ref_logits in zip(ids, reference(ids)):
            lp_ref, lp_q = _log_softmax(ref_logits[:-1]), _log_softmax(artifact_logits(row)[:-1])
            target = row[1:]
            nll_ref -= lp_ref[np.arange(len(target)), target].sum()
            nll_q -= lp_q[np.arange(len(target)), target].sum()
            kl += (np.exp(lp_ref) * (lp_ref - lp_q)).sum()
            agree += int((lp_ref.argmax(-1) == lp_q.argmax(-1)).sum())
            count += len(target)
        prompts = ids[:greedy_prompts, : min(32, seq_len // 2)]
        continued = []  # the artifact's greedy continuations, run first
        for prompt in prompts:
            sequence = list(prompt)
            for _ in range(greedy_tokens):
                sequence.append(int(artifact_logits(np.asarray(sequence))[-1].argmax()))
            continued.append(sequence)
        continued = np.asarray(continued)
        # One reference pass over them (not one per new token: a full-size source is read from disk each pass): while
        # the two greedy continuations agree, the prefixes are equal, so the first position where the reference's
        # argmax differs from the artifact's token is where its own greedy continuation would first differ.
        start = prompts.shape[1]
        reference_next = reference(continued[:, :-1]).argmax(-1)[:, start - 1:]
        lengths = [next((i for i, (a, b) in enumerate(zip(ref_row, mine)) if a != b), greedy_tokens)
                   for ref_row, mine in zip(reference_next, continued[:, start:])]
    ppl_ref, ppl_q = float(np.exp(nll_ref / count)), float(np.exp(nll_q / count))
    figures = {
        "perplexity_reference": ppl_ref,
        "perplexity_quantized": ppl_q,
        "perplexity_ratio": ppl_q / ppl_ref,
        "kl_mean": float(kl / count),
        "top1_agreement": agree / count,
        "greedy_agreement_tokens": float(np.mean(lengths)),
    }
    return {"eval_data": data, **({} if data_sha256 is None else {"eval_data_sha256": data_sha256}), "tokens": count, "windows": int(ids.shape[0]), "seq_len": int(seq_len),
            **{name: float(f"{value:.{REPORT_DIGITS}g}") for name, value in figures.items()},
            "greedy_tokens": greedy_tokens}
