"""Token embeddings and axial positional embeddings."""

from __future__ import annotations

import math
from typing import Any, Sequence

from .._arrays import device_of

__all__ = [
    "token_embedding",
    "token_embedding_backward",
    "axial_positions",
    "axial_positional_embedding",
    "axial_positional_embedding_backward",
]


def token_embedding(xp, tokens: Any, table: Any):
    """Rows of ``table (vocab, d)`` for int ``tokens (batch, length)`` -> ``(batch, length, d)``."""
    flat = xp.reshape(tokens, (-1,))
    return xp.reshape(xp.take(table, flat, axis=0), (*tokens.shape, table.shape[-1]))


def axial_positions(xp, length: int, axial_shape: Sequence[int], like: Any):
    """Per axis, the index of each flat position ``0..length-1`` in row-major axial order."""
    positions = xp.arange(length, dtype=xp.int64, device=device_of(like))
    out = []
    for axis, size in enumerate(axial_shape):
        stride = math.prod(axial_shape[axis + 1 :])
        out.append((positions // stride) % size)
    return out


def axial_positional_embedding(xp, weights: Sequence[Any], length: int):
    """Axial positional embedding of the first ``length`` positions -> ``(length, sum(d_k))``.

    ``weights[k]`` has shape ``(s_k, d_k)``. Position p, written in row-major axial
    coordinates ``(i_1, ..., i_K)`` over the shape ``(s_1, ..., s_K)``, gets
    ``concat(weights[1][i_1], ..., weights[K][i_K])``: the per-axis tables broadcast over the
    axial grid and concatenated, without materialising the grid.
    """
    shape = [w.shape[0] for w in weights]
    if length > math.prod(shape):
        raise ValueError(f"length {length} exceeds the axial capacity prod{tuple(shape)} = {math.prod(shape)}")
    indices = axial_positions(xp, length, shape, weights[0])
    return xp.concat([xp.take(w, idx, axis=0) for w, idx in zip(weights, indices)], axis=-1)


def token_embedding_backward(xp, tokens: Any, d_out: Any, vocab_size: int, *, rows_per_step: int | None = None):
    """Gradient of the embedding table: ``d_table[t] = sum of d_out at positions holding t``.

    A scatter-add in other frameworks; here a one-hot matrix product, ``onehot(tokens)^T @
    d_out``, taken ``rows_per_step`` positions at a time so the one-hot block stays small. It
    costs as many operations as the output projection and works on every Array API backend.
    """
    width = d_out.shape[-1]
    flat_tokens = xp.reshape(tokens, (-1,))
    flat_d = xp.reshape(d_out, (-1, width))
    if rows_per_step is None:
        rows_per_step = max(1, (1 << 22) // max(vocab_size, 1))  # ~4M one-hot entries per step
    vocab = xp.arange(vocab_size, dtype=flat_tokens.dtype, device=device_of(d_out))
    total = None
    for start in range(0, flat_tokens.shape[0], rows_per_step):
        stop = min(start + rows_per_step, flat_tokens.shape[0])
        one_hot = xp.astype(flat_tokens[start:stop, None] == vocab, d_out.dtype)
        part = xp.matmul(xp.matrix_transpose(one_hot), flat_d[start:stop, :])
        total = part if total is None else total + part
    return total


def axial_positional_embedding_backward(xp, weights: Sequence[Any], d_out: Any):
    """Gradients of the axial tables from ``d_out (length, sum(d_k))`` (summed over batch).

    Pads ``d_out`` with zeros up to ``prod(s_k)`` positions, views it as the axial grid
    ``(s_1, ..., s_K, d)``, and sums each table's columns over the other axes.
    """
    shape = [w.shape[0] for w in weights]
    total = math.prod(shape)
    length, width = d_out.shape
    if length < total:
        padding = xp.zeros((total - length, width), dtype=d_out.dtype, device=device_of(d_out))
        d_out = xp.concat([d_out, padding], axis=0)
    grid = xp.reshape(d_out, (*shape, width))
    grads, start = [], 0
    for axis, w in enumerate(weights):
        columns = grid[..., start : start + w.shape[1]]
        others = tuple(a for a in range(len(shape)) if a != axis)
        grads.append(xp.sum(columns, axis=others) if others else columns)
        start += w.shape[1]
    return grads
