"""Next-token choice from one row of logits: greedy, or seeded sampling with temperature, top-k and top-p.

Order (as transformers applies them): repetition penalty → greedy argmax when temperature is 0 → temperature →
top-k → top-p → draw from a seeded numpy Generator, so the same seed gives the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise GenerationError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise GenerationError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p={self.top_p}: must be in (0, 1] (1 = off)")
        if not self.repetition_penalty > 0:
            raise GenerationError(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1 = off)")


def apply_repetition_penalty(logits: np.ndarray, previous_ids: np.ndarray, penalty: float) -> np.ndarray:
    """For every token id already seen: logit / penalty if positive, logit × penalty otherwise (CTRL, as in HF)."""
    out = logits.astype(np.float32, copy=True)
    if penalty == 1.0 or previous_ids.size == 0:
        return out
    seen = np.unique(previous_ids)
    picked = out[seen]
    out[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    return out


def filter_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (ties with the k-th kept too), set the rest to −inf."""
    if k <= 0 or k >= logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, -np.inf)


def filter_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches p (always at least the top token)."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits[order])
    # A token stays if the mass before it is still below p.
    keep_sorted = (np.cumsum(probs) - probs) < p
    out = np.full_like(logits, -np.inf)
    kept = order[keep_sorted]
    out[kept] = logits[kept]
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = np.exp(x - x.max())
    return x / x.sum()


class Sampler:
    """Holds the seeded random generator of one generation; call it once per new token."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, previous_ids: np.ndarray) -> int:
        p = self.params
        scores = apply_repetition_penalty(logits, previous_ids, p.repetition_penalty)
        if p.temperature == 0:
            return int(np.argmax(scores))
        scores = filter_top_p(filter_top_k(scores / p.temperature, p.top_k), p.top_p)
        return int(self.rng.choice(scores.size, p=softmax(scores)))
