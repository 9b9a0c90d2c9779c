"""Next-token choice from one row of logits: greedy, or seeded sampling with temperature, top-k and top-p; the
log-probabilities a server reports; stop strings.

Order (as transformers applies them): repetition penalty → frequency / presence penalties (OpenAI's, over the
generated tokens only) → logit bias (OpenAI's: added to chosen tokens' logits) → greedy argmax when temperature is 0 → temperature → top-k → top-p → draw from a seeded
numpy Generator, so the same seed gives the same tokens.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import is_integer
from .errors import GenerationError

MAX_LOGIT_BIAS = 100.0  # OpenAI's range, ±100: enough to ban a token or to force it


REAL_OPTIONS = ("temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int = 0
    frequency_penalty: float = 0.0  # 0 = off; subtracted once per earlier occurrence in the generated tokens
    presence_penalty: float = 0.0  # 0 = off; subtracted once from every token generated before
    # (token id, bias) pairs sorted by id; a mapping given here is stored that way (the params stay hashable)
    logit_bias: tuple[tuple[int, float], ...] | Mapping[int, float] = ()

    def __post_init__(self) -> None:
        for name, kind, expected in (("top_k", numbers.Integral, "an integer"), ("seed", numbers.Integral, "an integer"),
                                     *((name, numbers.Real, "a number") for name in REAL_OPTIONS)):
            value = getattr(self, name)
            if not isinstance(value, kind) or isinstance(value, bool):  # not a TypeError further down; True no number
                raise GenerationError(f"{name}={value!r}: expected {expected}")
        for name in REAL_OPTIONS:
            if not math.isfinite(getattr(self, name)):
                raise GenerationError(f"{name}={getattr(self, name)}: must be a finite number")
        pairs = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        try:
            pairs = [(t, float(b)) for t, b in pairs]
        except (TypeError, ValueError):
            raise GenerationError(f"logit_bias={self.logit_bias!r}: give {{token id: bias}}") from None
        for token, _ in pairs:  # 1.5 was taken as token 1, "a" was a ValueError; "7" is OpenAI's form of 7
            if not (is_integer(token) or isinstance(token, str) and token.isascii() and token.isdigit()):
                raise GenerationError(f"logit_bias: key {token!r} is not a token id; key the biases by token ids")
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), b) for t, b in pairs)))
        ids = [token for token, _ in self.logit_bias]
        if len(set(ids)) != len(ids):
            raise GenerationError(f"logit_bias: token {max(ids, key=ids.count)} is given more than once; give it once")
        for token, bias in self.logit_bias:
            if token < 0:
                raise GenerationError(f"logit_bias: token id {token} is negative; give ids of the vocabulary")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise GenerationError(f"logit_bias: {bias} for token {token} is outside [-100, 100]")
        if not self.temperature >= 0:
            raise GenerationError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise GenerationError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p={self.top_p}: must be in (0, 1] (1 = off)")
        if not self.repetition_penalty > 0:
            raise GenerationError(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1 = off)")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise GenerationError(f"{name}={getattr(self, name)}: must be in [-2, 2] (0 = off)")

    def check_vocabulary(self, vocab_size: int) -> None:
        """Raise GenerationError if logit_bias names a token the model does not have."""
        outside = [token for token, _ in self.logit_bias if token >= vocab_size]
        if outside:
            raise GenerationError(f"logit_bias: token {outside[0]} is outside the vocabulary of {vocab_size} tokens")


def apply_repetition_penalty(logits: np.ndarray, previous_ids: np.ndarray, penalty: float) -> np.ndarray:
    """For every token id already seen: logit / penalty if positive, logit × penalty otherwise (CTRL, as in HF)."""
    if penalty == 1.0 or previous_ids.size == 0:
        return logits.astype(np.float32, copy=False)  # nothing below writes into it: no copy of the vocabulary
    out = logits.astype(np.float32, copy=True)
    seen = np.unique(previous_ids)
    picked = out[seen]
    with np.errstate(over="ignore"):  # a penalty beyond float32's range bans a seen token: its limit, not an error
        out[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    return out


def apply_frequency_presence_penalties(logits: np.ndarray, output_ids: np.ndarray, frequency: float,
                                       presence: float) -> np.ndarray:
    """OpenAI's penalties: logit[j] − count[j] × frequency − (count[j] > 0) × presence, count over the generated tokens."""
    if (frequency == 0 and presence == 0) or output_ids.size == 0:
        return logits
    ids, counts = np.unique(output_ids, return_counts=True)
    out = logits.copy()
    out[ids] -= (counts * frequency + presence).astype(out.dtype)
    return out


def apply_logit_bias(logits: np.ndarray, bias: tuple[tuple[int, float], ...]) -> np.ndarray:
    """logit[j] + bias[j] for every biased token j (OpenAI's logit_bias; −100 all but bans a token, +100 forces it)."""
    if not bias:
        return logits
    out = logits.astype(np.float32, copy=True)
    ids, values = zip(*bias)
    out[list(ids)] += np.asarray(values, np.float32)
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
        # any integer (OpenAI's are signed 64-bit), numpy's too (np.int64 % 2**64 overflowed): one stream each
        self.rng = np.random.default_rng(int(params.seed) % 2**64)

    def __call__(self, logits: np.ndarray, previous_ids: np.ndarray, output_ids: np.ndarray) -> int:
        """previous_ids: prompt + generated tokens (repetition penalty); output_ids: the generated ones alone
        (frequency / presence penalties)."""
        p = self.params
        scores = apply_repetition_penalty(logits, previous_ids, p.repetition_penalty)
        scores = apply_frequency_presence_penalties(scores, output_ids, p.frequency_penalty, p.presence_penalty)
        scores = apply_logit_bias(scores, p.logit_bias)
        if p.temperature == 0:
            return int(np.argmax(scores))
        with np.errstate(over="ignore"):
            temperature = np.float32(p.temperature)  # the scores' type, as llama4rt divides them (1e308: inf)
        if temperature == 0:  # too small for float32: its limit, greedy
            return int(np.argmax(scores))
        # shifted first: the top score stays 0 however small the temperature, the rest go to −inf (scores / 1e-38
        # overflowed to inf, and softmax's inf − inf made the probabilities NaN)
        with np.errstate(over="ignore"):
            tempered = (scores - scores.max()) / temperature
        scores = filter_top_p(filter_top_k(tempered, p.top_k), p.top_p)
        return int(self.rng.choice(scores.size, p=softmax(scores)))


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely tokens with their log-probabilities, most likely first


def token_logprobs(logits: np.ndarray, token_id: int, top: int = 0) -> TokenLogprobs:
    """The model's log-probability of `token_id` and of the `top` most likely tokens, from the raw logits (before
    penalties, temperature and filtering: what the model itself assigns)."""
    x = logits.astype(np.float64)
    log_probs = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
    best = np.argsort(-log_probs, kind="stable")[:top] if top > 0 else np.empty(0, np.int64)
    return TokenLogprobs(int(token_id), float(log_probs[token_id]), tuple((int(i), float(log_probs[i])) for i in best))


class StopStrings:
    """Cuts generated text at the first stop string (which is left out), holding back any tail that could still
    become one, so streamed text never shows part of a stop string."""

    def __init__(self, stops: tuple[str, ...]):
        if any(not s for s in stops):
            raise GenerationError("a stop string is empty; give non-empty strings")
        self.stops, self.held = stops, ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string ended the text)."""
        text = self.held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return text[:min(found)], True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1))
                    if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """What was held back, once generation ended for another reason."""
        text, self.held = self.held, ""
        return text
