"""Accuracy report: a quantized artifact on ONNX Runtime vs the unquantized PyTorch model, on held-out text.

Windows of the held-out token stream go through the artifact's prefill graph (logits for every position) and the
fp32 PyTorch model. Reported: perplexity of both and their ratio, mean KL(reference ‖ quantized) of the next-token
distributions, top-1 agreement, and the greedy-continuation agreement length (tokens generated greedily from a
prompt until the two first differ, averaged over prompts, capped at `greedy_tokens`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import corpus as corpus_mod

REPORT_FILE = "report.json"


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


class _OrtLogits:
    def __init__(self, artifact: Path):
        from ..runtime.generator import Generator

        self.generator = Generator.load(artifact, verify=False)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        cache = self.generator._cache_for(1)
        positions = np.arange(len(ids), dtype=np.int64)[None]
        return self.generator.backend.forward(ids[None].astype(np.int64), positions, cache).logits[0]


def _greedy(logits_of, prompt: np.ndarray, steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(logits_of(np.asarray(ids))[-1].argmax()))
    return ids[len(prompt):]


@torch.no_grad()
def accuracy_report(artifact: str | Path, reference_model, tokenizer, eval_data: str | Path | None = None,
                    windows: int = 8, seq_len: int = 256, greedy_prompts: int = 4, greedy_tokens: int = 16) -> dict:
    """The report dict (see the module docstring); eval_data None = the embedded corpus's held-out slice."""
    text = corpus_mod.load_corpus(eval_data, "heldout")
    tokens = corpus_mod.token_stream(text, tokenizer)
    seq_len = min(seq_len, len(tokens))
    ids = corpus_mod.cut_samples(tokens, windows, seq_len, text.source)
    quantized = _OrtLogits(Path(artifact))
    seq_len = min(seq_len, quantized.generator.backend.max_prefill_tokens)
    ids = ids[:, :seq_len]

    def reference(row: np.ndarray) -> np.ndarray:
        return reference_model(torch.from_numpy(row[None]))[0].float().numpy()

    nll_ref, nll_q, kl, agree, count = 0.0, 0.0, 0.0, 0, 0
    for row in ids:
        lp_ref, lp_q = _log_softmax(reference(row)[:-1]), _log_softmax(quantized(row)[:-1])
        target = row[1:]
        nll_ref -= lp_ref[np.arange(len(target)), target].sum()
        nll_q -= lp_q[np.arange(len(target)), target].sum()
        kl += (np.exp(lp_ref) * (lp_ref - lp_q)).sum()
        agree += int((lp_ref.argmax(-1) == lp_q.argmax(-1)).sum())
        count += len(target)
    lengths = []
    for row in ids[:greedy_prompts]:
        prompt = row[: min(32, seq_len // 2)]
        ref_tokens, q_tokens = _greedy(reference, prompt, greedy_tokens), _greedy(quantized, prompt, greedy_tokens)
        same = next((i for i, (a, b) in enumerate(zip(ref_tokens, q_tokens)) if a != b), greedy_tokens)
        lengths.append(same)
    ppl_ref, ppl_q = float(np.exp(nll_ref / count)), float(np.exp(nll_q / count))
    return {
        "eval_data": text.source,
        "tokens": count,
        "windows": int(ids.shape[0]),
        "seq_len": int(seq_len),
        "perplexity_reference": ppl_ref,
        "perplexity_quantized": ppl_q,
        "perplexity_ratio": ppl_q / ppl_ref,
        "kl_mean": float(kl / count),
        "top1_agreement": agree / count,
        "greedy_agreement_tokens": float(np.mean(lengths)),
        "greedy_tokens": greedy_tokens,
    }
