"""Token embeddings and axial positional embeddings."""

from __future__ import annotations

import math
from typing import Any, Sequence

from ._arrays import device_of

__all__ = ["token_embedding", "axial_positions", "axial_positional_embedding"]


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
