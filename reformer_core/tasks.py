"""The paper's duplication task (Reformer section 2.1): sequences ``0 w 0 w``."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["copy_task_batch", "copy_task_targets", "copy_task_accuracy"]


def copy_task_batch(rng: np.random.Generator, batch: int, length: int, vocab_size: int = 128) -> np.ndarray:
    """``(batch, length)`` int64 sequences ``0 w 0 w`` with ``w`` uniform over ``1 .. vocab_size-1``.

    ``length`` must be even; ``|w| = length / 2 - 1`` (the paper: 511 of 1024, symbols 1..127).
    """
    if length < 4 or length % 2:
        raise ValueError(f"the duplication task needs an even length >= 4, got {length}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    half = length // 2
    words = rng.integers(1, vocab_size, size=(batch, half - 1), dtype=np.int64)
    zeros = np.zeros((batch, 1), dtype=np.int64)
    return np.concatenate([zeros, words, zeros, words], axis=1)


def copy_task_targets(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Next-token targets and loss weights scoring only the predictable second-half tokens.

    Position p predicts token p + 1; the weights are 1 for ``p`` in ``[L/2, L-2]``, whose
    targets are the second copy of ``w``, and 0 elsewhere (the last position has no target).
    """
    batch, length = tokens.shape
    targets = np.concatenate([tokens[:, 1:], np.zeros((batch, 1), dtype=tokens.dtype)], axis=1)
    weights = np.zeros((batch, length), dtype=np.float64)
    weights[:, length // 2 : length - 1] = 1.0
    return targets, weights


def copy_task_accuracy(logits: Any, targets: np.ndarray, weights: np.ndarray, to_numpy=np.asarray) -> float:
    """Fraction of scored positions whose argmax prediction is the target."""
    predictions = np.argmax(to_numpy(logits), axis=-1)
    scored = weights > 0
    return float(np.mean(predictions[scored] == targets[scored]))
