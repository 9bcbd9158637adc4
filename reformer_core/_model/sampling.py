"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling,
written once for the host (NumPy, float64: :func:`choose_tokens`) and for compiled loops
(:func:`sample_with_uniforms` with uniforms drawn on the host)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._arrays import namespace

__all__ = ["sampling_filters", "sample_with_uniforms", "choose_tokens"]


def sampling_filters(vocab: int, temperature: float, top_k: int | None, top_p: float | None):
    """``(greedy, top_k, top_p)`` with the filters that keep everything switched off (None):
    ``top_k >= vocab`` and ``top_p == 1`` keep every token, so they are skipped."""
    greedy = temperature == 0
    top_k = top_k if top_k is not None and top_k < vocab else None
    top_p = top_p if top_p is not None and top_p < 1.0 else None
    return greedy, top_k, top_p


def sample_with_uniforms(xp, logits: Any, u: Any, temperature: Any, top_k: Any = None, top_p: Any = None):
    """The tokens sampling picks from float ``logits (batch, vocab)`` with the uniform numbers
    ``u (batch,)``, written once for the host (NumPy, float64) and for compiled loops.

    The logits are divided by ``temperature``; ``top_k`` keeps the k largest (ties to the lower
    id: ranks come from a stable sort); ``top_p`` then keeps the smallest set of most probable
    tokens whose probability reaches it; ``u * total`` picks a token by the inverse CDF of the
    kept probabilities (``searchsorted(cdf, u * cdf[-1], side="right")``, i.e. the number of
    CDF entries ``<= u * cdf[-1]``: the CDF of non-negative numbers never decreases), clipped
    to ``vocab - 1``. ``temperature``, ``top_k``, ``top_p`` may be traced scalars; None (see
    :func:`sampling_filters`) switches a filter off.
    """
    vocab = logits.shape[-1]
    z = logits / temperature
    if top_k is not None:
        order = xp.argsort(-z, axis=-1, stable=True)
        ranks = xp.argsort(order, axis=-1)  # the inverse permutation: each token's rank
        z = xp.where(ranks < top_k, z, xp.asarray(-math.inf, dtype=z.dtype))
    probs = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
    probs = probs / xp.sum(probs, axis=-1, keepdims=True)
    if top_p is not None:
        order = xp.argsort(-probs, axis=-1, stable=True)
        ranked = xp.take_along_axis(probs, order, axis=-1)
        before = xp.cumulative_sum(ranked, axis=-1) - ranked
        nucleus = xp.take_along_axis(before < top_p, xp.argsort(order, axis=-1), axis=-1)
        probs = xp.where(nucleus, probs, xp.zeros_like(probs))
        probs = probs / xp.sum(probs, axis=-1, keepdims=True)
    cdf = xp.cumulative_sum(probs, axis=-1)
    picks = xp.sum(xp.astype(cdf <= (u * cdf[:, -1])[:, None], xp.int64), axis=-1)
    return xp.minimum(picks, vocab - 1)


def choose_tokens(logits: np.ndarray, rng: np.random.Generator, *, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """The next token of each row of float ``logits (batch, vocab)``, on the host, in float64.

    ``temperature == 0``: greedy, the first index of the largest logit (no random numbers are
    drawn). Otherwise the logits are divided by ``temperature``; ``top_k`` keeps the k largest
    (ties to the lower id, so ``top_k=1`` is greedy); ``top_p`` then keeps the smallest set of
    most probable tokens whose probability reaches ``top_p``; one uniform number per row from
    ``rng`` (``rng.random(batch)``) picks a token by the inverse CDF of the kept, renormalised
    probabilities (:func:`sample_with_uniforms`).
    """
    logits = np.asarray(logits, dtype=np.float64)
    batch, vocab = logits.shape
    greedy, top_k, top_p = sampling_filters(vocab, temperature, top_k, top_p)
    if greedy:
        return np.argmax(logits, axis=-1).astype(np.int64)
    picks = sample_with_uniforms(namespace(logits), logits, rng.random(batch), float(temperature), top_k, top_p)
    return np.asarray(picks, dtype=np.int64)
