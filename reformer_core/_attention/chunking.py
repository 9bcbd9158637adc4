"""Cutting a sequence into chunks and looking at neighbouring chunks (wrapping at the ends)."""

from __future__ import annotations

from typing import Any

__all__ = ["split_chunks", "merge_chunks", "look_adjacent", "look_adjacent_backward", "pad_to_multiple"]


def split_chunks(xp, x: Any, chunk_length: int, axis: int = 2):
    """Split ``axis`` (length a multiple of ``chunk_length``) into (num_chunks, chunk_length)."""
    axis = axis % x.ndim
    shape = tuple(x.shape)
    num_chunks = shape[axis] // chunk_length
    return xp.reshape(x, (*shape[:axis], num_chunks, chunk_length, *shape[axis + 1 :]))


def merge_chunks(xp, x: Any, axis: int = 2):
    """Inverse of :func:`split_chunks`: merge ``axis`` and ``axis + 1``."""
    axis = axis % x.ndim
    shape = tuple(x.shape)
    return xp.reshape(x, (*shape[:axis], shape[axis] * shape[axis + 1], *shape[axis + 2 :]))


def look_adjacent(xp, x: Any, num_chunks_before: int, num_chunks_after: int, axis: int = 2):
    """Append to every chunk its neighbours: ``before`` chunks back and ``after`` forward.

    ``x`` has chunks on ``axis`` and their items on ``axis + 1``. The result puts, along
    ``axis + 1``, chunks ``c - before, ..., c, ..., c + after`` (indices modulo the number of
    chunks, so the first chunk looks back at the last) in that order.
    """
    if num_chunks_before == 0 and num_chunks_after == 0:
        return x
    axis = axis % x.ndim
    # roll by +s brings chunk c - s to slot c.
    parts = [x if s == 0 else xp.roll(x, s, axis=axis) for s in range(num_chunks_before, -num_chunks_after - 1, -1)]
    return xp.concat(parts, axis=axis + 1)


def look_adjacent_backward(xp, d_windows: Any, num_chunks_before: int, num_chunks_after: int, axis: int = 2):
    """VJP of :func:`look_adjacent`: roll each neighbour's slice back and sum (no scatter)."""
    if num_chunks_before == 0 and num_chunks_after == 0:
        return d_windows
    axis = axis % d_windows.ndim
    shifts = range(num_chunks_before, -num_chunks_after - 1, -1)
    width = d_windows.shape[axis + 1] // len(shifts)
    lead = (slice(None),) * (axis + 1)
    total = None
    for k, s in enumerate(shifts):
        part = d_windows[(*lead, slice(k * width, (k + 1) * width), ...)]
        part = part if s == 0 else xp.roll(part, -s, axis=axis)
        total = part if total is None else total + part
    return total


def pad_to_multiple(x: Any, multiple: int, *, value: Any = 0):
    """Pad a ``(batch, length, ...)`` array at the end of ``length`` up to a multiple.

    Returns ``(padded, attention_mask)``: the mask is bool ``(batch, padded_length)``, True
    at the original positions. Use it when a sequence length is not a multiple of the chunk
    length, and pass the mask on so padding is never attended to.
    """
    from .._arrays import device_of, namespace

    xp = namespace(x)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    if x.ndim < 2:
        raise ValueError(f"x must be (batch, length, ...), got shape {tuple(x.shape)}")
    batch, length = x.shape[0], x.shape[1]
    missing = (-length) % multiple
    device = device_of(x)
    positions = xp.arange(length + missing, device=device)
    keep = xp.broadcast_to(positions < length, (batch, length + missing))
    if missing:
        filler = xp.full((batch, missing, *x.shape[2:]), value, dtype=x.dtype, device=device)
        x = xp.concat([x, filler], axis=1)
    return x, keep
