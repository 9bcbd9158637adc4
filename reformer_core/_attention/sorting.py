"""Sorting positions by bucket, gathering, and undoing the sort (no scatter anywhere)."""

from __future__ import annotations

from typing import Any

from .._arrays import gather_positions

__all__ = ["sort_by_bucket", "unsort"]


def sort_by_bucket(xp, buckets: Any):
    """Permutation that sorts every round's positions by (bucket, position).

    Args:
        buckets: int64 ``(batch, heads, num_hashes, length)`` with round offsets, so round r's
            ids all lie above round r-1's.

    Returns:
        ``(perm, undo)``, int64 ``(batch, heads, num_hashes * length)``. ``perm[s]`` is the
        flat index ``round * length + position`` of the item at sorted slot ``s``; ``undo`` is
        its inverse, ``argsort(perm)``, so ``sorted[undo] == original``.

    The sort key is the bucket id alone: a stable sort keeps equal buckets in flat
    (round, position) order, which is the position order the tie-break needs. No combined
    key such as ``bucket * length + position`` is formed, so nothing can overflow, also with
    JAX's 32-bit integers (no x64) at any length and bucket count.
    """
    batch, heads, num_hashes, length = buckets.shape
    keys = xp.reshape(buckets, (batch, heads, num_hashes * length))
    perm = xp.argsort(keys, axis=-1, stable=True)
    undo = xp.argsort(perm, axis=-1, stable=True)
    return xp.astype(perm, xp.int64), xp.astype(undo, xp.int64)


def unsort(xp, sorted_values: Any, undo: Any):
    """Put sorted rows ``(b, h, n*L, ...)`` back in (round, position) order.

    Works for ``(b, h, n*L, d)`` rows and ``(b, h, n*L)`` scalars per slot.
    """
    if sorted_values.ndim == undo.ndim:
        return xp.take_along_axis(sorted_values, undo, axis=-1)
    return gather_positions(xp, sorted_values, undo)
