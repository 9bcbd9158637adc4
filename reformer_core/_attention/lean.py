"""The memory-lean recompute path of LSH attention's hand-written VJP, once against the Array API.

The standard path (``lsh_with_buckets`` under :func:`standard_path`) builds every chunk's
window (``look_adjacent`` copies of keys, values and positions) and its masks, and keeps every
chunk's probabilities for the pullback: O(length x window) per layer. Here the sorted chunks
are processed in blocks whose logits stay under :data:`BLOCK_BYTES`. Each block gathers its
queries and its window rows by index (the window of chunk i holds chunks ``i - before .. i +
after`` modulo the number of chunks, over all rounds, in ``look_adjacent``'s order), compares
its masks from positions, builds its slice of the duplicate-correction bias and of the dropout
mask, and runs the core's :func:`attend` on them. The forward keeps its inputs, the sort and,
per round, the outputs and log-sum-exps (which ``combine_rounds`` needs anyway); the pullback
recomputes each block's probabilities and runs :func:`attend_backward` on the block, then adds
the window gradients back onto the sorted rows they were read from by overlap-add (each window
slot is a shift of the chunk axis: no scatter). Memory: O(length) plus one block.

The probabilities are recomputed the way the forward computed them (max, exp, explicit
normalisation), not as ``exp(logits - lse)``: in float32 that form loses up to ulp(1e5) of the
mass where the -1e5 self value is a row's largest logit, the reason ``attend`` normalises
explicitly. The semantics are ``attend``'s by construction (masks and their order, non-finite
value rows, 16-bit inputs computed in float32, dropout scaling), so results equal the standard
path's to rounding.
"""

from __future__ import annotations

from typing import Any

from .._arrays import device_of
from .attend import (
    attend,
    attend_backward,
    broadcast_keep,
    check_dropout,
    logits_dtype,
    shared_qk_keys,
    shared_qk_keys_backward,
)
from .rounds import combine_rounds, combine_rounds_backward

__all__ = ["BLOCK_BYTES", "lean_lsh_attention"]

# Logits of one block of chunks; its masks, probabilities and their gradients are alike in
# size, so a block's temporaries take a few times this. A block always holds at least
# ``num_chunks_before + num_chunks_after`` chunks of a row. NumPy runs fastest with small
# blocks (measured: 1-4 MiB about alike, 16 MiB slower and ~100 MiB of temporaries).
BLOCK_BYTES = 4 << 20


def lean_lsh_attention(xp, qk: Any, v: Any, perm: Any, undo: Any, keep: Any, *, chunk_length: int,
                       num_chunks_before: int, num_chunks_after: int, causal: bool, duplicate_correction: bool = False,
                       dropout_rate: float = 0.0, dropout_keep: Any = None):
    """``lsh_with_buckets(..., with_pullback=True)`` from the sort on: ``(result, pullback)``.

    ``qk``, ``v``: ``(b, h, L, d)``; ``perm``/``undo`` from ``sort_by_bucket``; ``keep``: bool
    ``(b, L)`` or None; ``dropout_keep``: ``(b, h, n*L // chunk_length, chunk_length, window)``
    or None. ``pullback(d_result) -> (d_qk, d_v)``.
    """
    lay = _Layout(xp, qk, perm, chunk_length, num_chunks_before, num_chunks_after)
    if dropout_keep is not None or dropout_rate:
        check_dropout(xp, dropout_rate, dropout_keep,
                      (lay.batch, lay.heads, lay.chunks, lay.c, lay.width * lay.c))
    src = _Sources(xp, lay, qk, v, perm, undo, keep, duplicate_correction, dropout_keep)
    options = dict(causal=causal, self_mask=True, dropout_rate=dropout_rate)
    batch, heads, length, head_dim = lay.batch, lay.heads, lay.length, lay.head_dim

    out_groups, lse_groups = [], []
    for r0, r1, spans in lay.groups:
        parts = []
        for s, e in spans:
            q, k, val, kwargs = src.block(r0, r1, s, e)
            parts.append(attend(xp, q, k, val, **kwargs, **options))
        out_groups.append(src.to_rounds(_cat(xp, [p[0] for p in parts], 1), r0, r1))
        lse_groups.append(src.to_rounds(_cat(xp, [p[1] for p in parts], 1), r0, r1))
        del parts
    outs = xp.reshape(_cat(xp, out_groups, 0), (batch, heads, lay.rounds, length, head_dim))
    lses = xp.reshape(_cat(xp, lse_groups, 0), (batch, heads, lay.rounds, length))
    del out_groups, lse_groups
    result = combine_rounds(xp, outs, lses)

    def gathered(groups):  # per-group (r, L, d) -> (b, h, L, d)
        return xp.reshape(_cat(xp, groups, 0), (batch, heads, length, head_dim))

    def pullback(d_result):
        d_outs, d_lses = combine_rounds_backward(xp, outs, lses, d_result)
        g = xp.reshape(src.to_sorted(d_outs), (lay.rows, lay.chunks, lay.c, head_dim))
        g_lse = None if d_lses is None else xp.reshape(src.to_sorted(d_lses), (lay.rows, lay.chunks, lay.c))
        del d_outs, d_lses
        dq_groups, dk_groups, dv_groups = [], [], []
        for r0, r1, spans in lay.groups:
            dq_parts, dk_halos, dv_halos = [], [], []
            for s, e in spans:
                q, k, val, kwargs = src.block(r0, r1, s, e)
                # The probabilities again, exactly as the forward made them; a zero-width value
                # skips the forward's product with the values (its output is not needed).
                _, _, residuals = attend(xp, q, k, val[..., :0], **kwargs, **options, return_residuals=True)
                dq, dk, dv = attend_backward(
                    xp, q, k, val, residuals, g[r0:r1, s:e, ...],
                    None if g_lse is None else g_lse[r0:r1, s:e, ...],
                    dropout_keep=kwargs["dropout_keep"], dropout_rate=dropout_rate,
                )
                dq_parts.append(dq)
                dk_halos.append(_halo(xp, dk, lay))
                dv_halos.append(_halo(xp, dv, lay))
                del residuals, q, k, val, kwargs, dk, dv
            # Each group ends as (r, L, d), its rounds added: no sorted gradient outlives its group.
            dq_groups.append(xp.sum(src.to_rounds(_cat(xp, dq_parts, 1), r0, r1), axis=1))
            del dq_parts
            for halos, groups in ((dk_halos, dk_groups), (dv_halos, dv_groups)):
                line = _overlap_add(xp, halos, spans, lay)
                halos.clear()
                groups.append(xp.sum(src.to_rounds(line, r0, r1, shift=lay.before * lay.c), axis=1))
                del line
        del g, g_lse
        d_qk = gathered(dq_groups) + shared_qk_keys_backward(xp, qk, gathered(dk_groups))
        return d_qk, gathered(dv_groups)

    return result, pullback


class _Layout:
    """Sizes of one call and its blocks: ``groups`` is ``[(r0, r1, [(s, e), ...]), ...]``, rows
    ``r0:r1`` of the ``batch * heads`` rows, each cut into the chunk spans ``s:e``."""

    def __init__(self, xp, qk, perm, chunk_length, before, after):
        self.batch, self.heads, self.length, self.head_dim = qk.shape
        self.rows = self.batch * self.heads
        self.total = perm.shape[-1]  # num_hashes * length sorted slots
        self.rounds = self.total // self.length
        self.c = chunk_length
        self.chunks = self.total // chunk_length
        self.before, self.after = before, after
        self.width = before + 1 + after  # chunks per window
        itemsize = xp.finfo(logits_dtype(xp, qk.dtype)).bits // 8
        self.groups = _plan(self.rows, self.chunks, chunk_length * self.width * chunk_length * itemsize,
                            self.width)


def _plan(rows, chunks, chunk_bytes, width):
    """Blocks of whole rows while a row's logits fit :data:`BLOCK_BYTES`, else of chunk spans of
    one row, each at least ``width - 1`` chunks long (so a window's halo overlaps only the
    neighbouring spans: see :func:`_overlap_add`)."""
    fit = max(1, BLOCK_BYTES // chunk_bytes)
    if fit >= chunks:
        step = fit // chunks
        return [(r, min(r + step, rows), [(0, chunks)]) for r in range(0, rows, step)]
    starts = list(range(0, chunks, max(fit, width - 1)))
    if len(starts) > 1 and chunks - starts[-1] < width - 1:
        starts.pop()  # the last span joins the one before it
    spans = list(zip(starts, starts[1:] + [chunks]))
    return [(r, r + 1, spans) for r in range(rows)]


class _Sources:
    """What blocks are gathered from: inputs as ``(batch * heads * L, ...)`` rows (a row is
    gathered with one ``take``, much faster than ``take_along_axis`` in NumPy), positions of the
    sorted slots, the padding keep mask, each position's chunk per round (duplicate
    correction) and the dropout mask per chunk."""

    def __init__(self, xp, lay, qk, v, perm, undo, keep, duplicate_correction, dropout_keep):
        rows, length, head_dim = lay.rows, lay.length, lay.head_dim
        self.xp, self.lay, self.device, self.dtype = xp, lay, device_of(qk), qk.dtype
        self.positions = xp.reshape(perm % length, (rows, lay.total))  # original position of every slot
        self.perm, self.undo = xp.reshape(perm, (rows, lay.total)), xp.reshape(undo, (rows, lay.total))
        self.qk = xp.reshape(qk, (rows * length, head_dim))
        self.keys = xp.reshape(shared_qk_keys(xp, qk), (rows * length, head_dim))
        self.v = xp.reshape(v, (rows * length, head_dim))
        self.keep = None if keep is None else xp.reshape(broadcast_keep(xp, keep, lay.heads), (rows * length,))
        self.chunk_of = None  # (rows * L, n): the sorted chunk of every position's round-r copy
        if duplicate_correction and lay.rounds > 1:
            chunk_of = xp.permute_dims(xp.reshape(undo // lay.c, (rows, lay.rounds, length)), (0, 2, 1))
            self.chunk_of = xp.reshape(chunk_of, (rows * length, lay.rounds))
        self.dropout = None if dropout_keep is None else xp.reshape(
            dropout_keep, (rows, lay.chunks, lay.c, lay.width * lay.c))

    def arange(self, start, stop):
        return self.xp.arange(start, stop, dtype=self.xp.int64, device=self.device)

    def to_rounds(self, sorted_rows, r0, r1, shift=0):
        """Rows ``r0:r1`` in sorted order, ``(r, chunks, c, ...)``, as ``(r, n, L, ...)`` in
        (round, position) order; with ``shift``, sorted slot ``s`` is read at ``s + shift``
        (modulo the slots)."""
        xp, lay = self.xp, self.lay
        rows, tail = r1 - r0, tuple(sorted_rows.shape[3:])
        undo = self.undo[r0:r1, ...]
        if shift:
            undo = (undo + shift) % lay.total
        index = xp.reshape(self.arange(0, rows)[:, None] * lay.total + undo, (-1,))
        flat = xp.take(xp.reshape(sorted_rows, (rows * lay.total, *tail)), index, axis=0)
        return xp.reshape(flat, (rows, lay.rounds, lay.length, *tail))

    def to_sorted(self, x):
        """``(b, h, n, L, ...)`` in (round, position) order -> ``(b * h, n * L, ...)`` sorted."""
        xp, lay = self.xp, self.lay
        tail = tuple(x.shape[4:])
        index = xp.reshape(self.arange(0, lay.rows)[:, None] * lay.total + self.perm, (-1,))
        flat = xp.take(xp.reshape(x, (lay.rows * lay.total, *tail)), index, axis=0)
        return xp.reshape(flat, (lay.rows, lay.total, *tail))

    def block(self, r0, r1, s, e):
        """``(query, key, value, kwargs)`` of :func:`attend` for chunks ``s:e`` of rows ``r0:r1``:
        ``(r, m, c, d)``, ``(r, m, window, d)`` twice, positions, masks, bias and dropout."""
        xp, lay = self.xp, self.lay
        rows, m, c, window = r1 - r0, e - s, lay.c, lay.width * lay.c
        chunk = (self.arange(s, e)[:, None] + self.arange(-lay.before, lay.after + 1)[None, :]) % lay.chunks
        slots = xp.reshape(chunk[:, :, None] * c + self.arange(0, c)[None, None, :], (m * window,))  # (m*W*c,)
        positions = self.positions[r0:r1, ...]
        q_pos = positions[:, s * c:e * c]
        k_pos = xp.take(positions, slots, axis=1)  # (r, m * window)
        first_row = self.arange(r0, r1)[:, None] * lay.length
        q_rows, k_rows = xp.reshape(first_row + q_pos, (-1,)), xp.reshape(first_row + k_pos, (-1,))

        def at(x, index, shape):
            return xp.reshape(xp.take(x, index, axis=0), (rows, m, *shape))

        kwargs = dict(query_positions=xp.reshape(q_pos, (rows, m, c)),
                      key_positions=xp.reshape(k_pos, (rows, m, window)),
                      key_keep=None if self.keep is None else at(self.keep, k_rows, (window,)),
                      logit_bias=None, dropout_keep=None)
        if self.chunk_of is not None:
            kwargs["logit_bias"] = self._bias(at(self.chunk_of, q_rows, (c, lay.rounds)),
                                              at(self.chunk_of, k_rows, (window, lay.rounds)))
        if self.dropout is not None:
            kwargs["dropout_keep"] = self.dropout[r0:r1, s:e, ...]
        head_dim = lay.head_dim
        return (at(self.qk, q_rows, (c, head_dim)), at(self.keys, k_rows, (window, head_dim)),
                at(self.v, k_rows, (window, head_dim)), kwargs)

    def _bias(self, query_chunks, key_chunks):
        """``-log N_ij`` of one block, as ``duplicate_counts`` counts it: the pairs (round r,
        offset o) and rounds r2 such that key j's round-r2 copy sits in chunk
        ``chunk_i(r) + o`` (modulo the number of chunks). ``query_chunks (r, m, c, n)`` and
        ``key_chunks (r, m, window, n)`` are the chunks of the block's rows' round copies."""
        xp, lay = self.xp, self.lay
        counts = None
        for r in range(lay.rounds):
            for offset in range(-lay.before, lay.after + 1):
                target = (query_chunks[..., r] + offset) % lay.chunks
                for r2 in range(lay.rounds):
                    hit = xp.astype(key_chunks[..., None, :, r2] == target[..., None], xp.int64)
                    counts = hit if counts is None else counts + hit
        return -xp.log(xp.astype(counts, self.dtype))


def _cat(xp, parts, axis):
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=axis)


def _zeros_chunks(xp, like, count):
    return xp.zeros((like.shape[0], count, *like.shape[2:]), dtype=like.dtype, device=device_of(like))


def _halo(xp, d_windows, lay):
    """Window gradients ``(r, m, window, d)`` of chunks ``s:e`` summed onto the ``m + W - 1``
    chunks ``s - before .. e + after - 1`` they were read from: slot o of chunk i is halo chunk
    ``i - s + o``, a shift of the chunk axis."""
    rows, m, _, head_dim = d_windows.shape
    if lay.width == 1:
        return d_windows
    slots = xp.reshape(d_windows, (rows, m, lay.width, lay.c, head_dim))
    total = None
    for o in range(lay.width):
        part = slots[:, :, o, ...]
        pieces = [_zeros_chunks(xp, part, o)] if o else []
        pieces += [part] + ([_zeros_chunks(xp, part, lay.width - 1 - o)] if o < lay.width - 1 else [])
        part = xp.concat(pieces, axis=1)
        total = part if total is None else total + part
    return total


def _overlap_add(xp, halos, spans, lay):
    """Sorted-row gradients ``(r, chunks, c, d)`` from the halos of a row group's spans.

    Laid on an unwrapped line of chunks ``-before .. chunks + after - 1``, the halo of span
    ``s:e`` covers ``s .. e + W - 2``; spans hold at least ``W - 1`` chunks, so only neighbours
    overlap, in ``W - 1`` chunks. The line is then folded modulo the number of chunks.
    """
    edge = lay.width - 1
    (s0, e0), first = spans[0], halos[0]
    pieces, carry = [first[:, :e0 - s0, ...]], first[:, e0 - s0:, ...]
    for halo, (s, e) in zip(halos[1:], spans[1:]):
        pieces += [carry + halo[:, :edge, ...], halo[:, edge:e - s, ...]]
        carry = halo[:, e - s:, ...]
    line = _cat(xp, [p for p in pieces + [carry] if p.shape[1]], 1)
    folds = -(-line.shape[1] // lay.chunks)
    if folds > 1:
        if folds * lay.chunks > line.shape[1]:
            line = xp.concat([line, _zeros_chunks(xp, line, folds * lay.chunks - line.shape[1])], axis=1)
        line = xp.sum(xp.reshape(line, (line.shape[0], folds, lay.chunks, *line.shape[2:])), axis=1)
    return line  # line[t] holds sorted chunk (t - before) mod chunks: read it with a shift of before
