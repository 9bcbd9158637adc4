"""The fast path of LSH attention on torch: sorted-chunk attention as one ``autograd.Function``.

The core (``reformer_core/_attention/lsh.py``) hashes and sorts; this module does the hot
step that follows, with the core's exact semantics (``attend``: bias, then causal/padding
masks replaced by -1e9, then the self mask by -1e5, an explicitly normalised softmax, the
log-sum-exp per row, then ``combine_rounds``), but laid out for speed and memory:

* the sorted queries, keys and values are gathered once, batch-major ``(b*h, rows, d)``;
  keys and values get a halo (``num_chunks_before`` chunks in front, ``num_chunks_after``
  behind, wrapping), so every chunk's window is a run of consecutive rows: an overlapping
  ``as_strided`` view, never a copy (``bmm`` reads it in place);
* chunks are processed in blocks whose logits stay under :data:`BLOCK_BYTES`; masks are
  compared from positions per block, filled in place;
* the forward keeps only the sorted queries/keys/values, positions and the per-round outputs
  and log-sum-exps; the backward recomputes each block's probabilities (flash-style), so
  memory is O(length) per layer, not O(length x window);
* gradients are summed back over rounds and halo copies by gathers and slice additions in a
  fixed order (no atomic scatter), so they are deterministic on every device.

Autocast is switched off inside, and 16-bit inputs are computed in float32 (the core's
``logits_dtype``): the mask constants always fit the logits, and the result comes back in the
input dtype. Value rows holding NaN or inf are zeroed for the products and the queries that
attend to one with a nonzero probability get NaN outputs, as in the core's ``attend``: a
masked position never leaks into an output.
"""

from __future__ import annotations

import torch

from reformer_core._attention.attend import mask_values, shared_qk_keys
from reformer_core._attention.rounds import combine_rounds, combine_rounds_backward

__all__ = ["lsh_chunk_attention", "BLOCK_BYTES"]

BLOCK_BYTES = 8 << 20  # logits of one block of chunks (its masks and probabilities are alike)


def lsh_chunk_attention(qk, v, perm, undo, *, key_keep, logit_bias, dropout_keep, dropout_rate, chunk_length,
                        num_chunks_before, num_chunks_after, causal):
    """Sorted-chunk attention and round combination for sorted ``perm``/``undo`` ``(b, h, n*L)``.

    ``qk``, ``v``: ``(b, h, L, d)``; ``key_keep``: bool ``(b, L)`` or None; ``logit_bias`` and
    ``dropout_keep``: ``(b, h, n*L // chunk_length, chunk_length, window)`` or None. Returns
    ``(b, h, L, d)``, differentiable in ``qk`` and ``v`` by torch.autograd.
    """
    from array_api_compat import torch as xp

    keys = shared_qk_keys(xp, qk)  # autograd differentiates the key normalisation itself
    wide = torch.promote_types(qk.dtype, torch.float32)  # logits_dtype: float32 for 16-bit inputs
    result = _SortedChunkAttention.apply(qk.to(wide), keys.to(wide), v.to(wide), perm, undo, key_keep, logit_bias,
                                         dropout_keep, float(dropout_rate), chunk_length, num_chunks_before,
                                         num_chunks_after, bool(causal))
    return result.to(v.dtype)


class _Geometry:
    """Sizes, the halo's chunk order and the blocks of one call."""

    def __init__(self, qk, perm, chunk_length, before, after):
        batch, heads, length, head_dim = qk.shape
        self.shape = (batch, heads, length, head_dim)
        self.bh, self.length, self.d = batch * heads, length, head_dim
        self.rows = perm.shape[-1]  # n * L
        self.rounds = self.rows // length
        self.c = chunk_length
        self.chunks = self.rows // chunk_length
        self.before, self.after = before, after
        self.width = before + 1 + after  # chunks per window
        self.halo_rows = (self.chunks + before + after) * chunk_length
        per_chunk = chunk_length * self.width * chunk_length * qk.element_size()
        per_block = max(1, BLOCK_BYTES // per_chunk)
        if per_block >= self.chunks:  # whole sequences fit: a block spans several (batch, head) rows
            step = per_block // self.chunks
            self.blocks = [(h, min(h + step, self.bh), 0, self.chunks) for h in range(0, self.bh, step)]
        else:
            self.blocks = [(h, h + 1, s, min(s + per_block, self.chunks))
                           for h in range(self.bh) for s in range(0, self.chunks, per_block)]

        # (chunk, window slot) pairs whose slot holds a chunk of another round (or the chunk
        # itself, wrapped round a short sequence): where a query may meet its position off the diagonal.
        per_round = length // chunk_length
        self.cross = [(i, k) for i in range(self.chunks) for k in range(self.width) if k != before
                      for j in [(i + k - before) % self.chunks] if j == i or i // per_round != j // per_round]

    def halo_index(self, device):
        """Sorted row of every halo row: chunks ``-before .. chunks + after - 1`` mod chunks."""
        chunk = torch.arange(-self.before, self.chunks + self.after, device=device) % self.chunks
        return (chunk[:, None] * self.c + torch.arange(self.c, device=device)).reshape(-1)


def _gather_rows(x, flat_index, geo, count):
    """Rows of ``x (b, h, L, d)`` at flat indices ``(b*h*count,)`` -> ``(b*h, count, d)``."""
    return x.reshape(geo.bh * geo.length, geo.d).index_select(0, flat_index).view(geo.bh, count, geo.d)


def _window(x, geo, h0, h1, s, e):
    """The windows of chunks ``s:e`` of halo rows ``x (b*h, halo_rows, ...)``: a view
    ``(h1-h0, e-s, window_rows, ...)`` whose windows overlap in memory."""
    base = x[h0:h1, s * geo.c:]
    tail = tuple(base.shape[2:])
    tail_strides = tuple(base.stride()[2:])
    return base.as_strided((h1 - h0, e - s, geo.width * geo.c, *tail),
                           (base.stride(0), geo.c * base.stride(1), base.stride(1), *tail_strides))


def _chunks(x, geo, h0, h1, s, e):
    """Sorted rows ``x (b*h, n*L, ...)`` of chunks ``s:e`` as ``(h1-h0, e-s, c, ...)``."""
    part = x[h0:h1, s * geo.c:e * geo.c]
    return part.view(h1 - h0, e - s, geo.c, *part.shape[2:])  # a view: results are written through it


def _matmul(a, b, out):
    """Batched matmul of ``(g, m, i, k) @ (g, m, k, j)`` into ``out``; with one group as a 3-D
    ``bmm``, which reads overlapping window views in place."""
    if a.shape[0] == 1:
        torch.bmm(a[0], b[0], out=out[0])
    else:
        torch.matmul(a, b, out=out)
    return out


class _Workspace:
    """Buffers reused by every block of one call: fresh large tensors cost page faults, which
    on some machines take longer than the arithmetic that fills them."""

    def __init__(self, dtype, device):
        self._buffers: dict = {}
        self.dtype, self.device = dtype, device

    def get(self, name, shape, dtype=None):
        dtype = self.dtype if dtype is None else dtype
        count = 1
        for size in shape:
            count *= size
        buffer = self._buffers.get((name, dtype))
        if buffer is None or buffer.numel() < count:  # the first block is the largest
            buffer = self._buffers[(name, dtype)] = torch.empty(count, dtype=dtype, device=self.device)
        return buffer[:count].view(shape)


class _Saved:
    """What one block's logits are computed from (the forward's inputs or the saved tensors)."""

    def __init__(self, q, k, v, pos, pos_halo, keep_halo, bias, keep_drop, rate, causal, bad=None):
        self.q, self.k, self.v, self.bad = q, k, v, bad
        self.pos, self.pos_halo, self.keep_halo = pos, pos_halo, keep_halo
        self.bias, self.keep_drop, self.rate, self.causal = bias, keep_drop, rate, causal


def _block_shape(geo, block, last):
    h0, h1, s, e = block
    return (h1 - h0, e - s, geo.c, last)


def _block_probs(saved, geo, block, work):
    """Probabilities ``(g, m, c, window_rows)`` of one block (a workspace buffer) and the row
    maxima of its masked logits (``lse = top - log(max p)``, as ``max p = exp(0) / total``)."""
    h0, h1, s, e = block
    shape = _block_shape(geo, block, geo.width * geo.c)
    q = _chunks(saved.q, geo, h0, h1, s, e)
    logits = _matmul(q, _window(saved.k, geo, h0, h1, s, e).transpose(-1, -2), work.get("logits", shape))
    if saved.bias is not None:
        logits += saved.bias[h0:h1, s:e]
    mask_value, self_value = mask_values(torch, logits.dtype)
    masked = None
    if saved.causal:
        query_pos = _chunks(saved.pos, geo, h0, h1, s, e)[..., None]
        key_pos = _window(saved.pos_halo, geo, h0, h1, s, e)[..., None, :]
        masked = torch.gt(key_pos, query_pos, out=work.get("masked", shape, torch.bool))
    if saved.keep_halo is not None:
        padding = torch.logical_not(_window(saved.keep_halo, geo, h0, h1, s, e))[..., None, :]
        masked = padding if masked is None else torch.logical_or(masked, padding, out=masked)
    if masked is not None:
        logits.masked_fill_(masked, mask_value)
    _fill_self(logits, saved, geo, block, self_value)
    top = logits.amax(dim=-1, keepdim=True)
    probs = torch.ops.aten._softmax.out(logits, -1, False, out=work.get("probs", shape))
    return probs, top


def _fill_self(x, saved, geo, block, value):
    """Set the entries of ``x (g, m, c, window_rows)`` where a query meets its own position.

    Every query sees itself on the diagonal of its own chunk (a strided view, no mask); another
    copy of its position can only sit in a window chunk of another hashing round, or in its own
    chunk again when the window wraps round a short sequence: :attr:`_Geometry.cross`.
    """
    h0, h1, s, e = block
    c, own = geo.c, geo.before
    x[..., own * c:(own + 1) * c].diagonal(dim1=-2, dim2=-1).fill_(value)
    for chunk, k in (pair for pair in geo.cross if s <= pair[0] < e):
        query_pos = saved.pos[h0:h1, chunk * c:(chunk + 1) * c]
        key_pos = saved.pos_halo[h0:h1, (chunk + k) * c:(chunk + k + 1) * c]
        x[:, chunk - s, :, k * c:(k + 1) * c].masked_fill_(key_pos[:, None, :] == query_pos[:, :, None], value)


def _lse(probs, top):
    return (top - torch.log(probs.amax(dim=-1, keepdim=True))).squeeze(-1)


def _dropped(probs, saved, block, out=None):
    """``dropout(probs)`` as the core's ``dropout``: kept entries times ``1 / (1 - rate)``, in
    place or into ``out``."""
    if saved.keep_drop is None or saved.rate == 0.0:
        return probs
    h0, h1, s, e = block
    drop = torch.logical_not(saved.keep_drop[h0:h1, s:e])
    if out is None:
        return probs.mul_(1.0 / (1.0 - saved.rate)).masked_fill_(drop, 0.0)
    return torch.mul(probs, 1.0 / (1.0 - saved.rate), out=out).masked_fill_(drop, 0.0)


def _add_windows(target, d_windows, geo, block):
    """Add window-shaped gradients ``(g, m, window_rows, d)`` into halo rows ``target``."""
    h0, h1, s, e = block
    for k in range(geo.width):
        rows = target[h0:h1, (s + k) * geo.c:(e + k) * geo.c].view(h1 - h0, e - s, geo.c, geo.d)
        rows += d_windows[:, :, k * geo.c:(k + 1) * geo.c]


def _fold_halo(halo, geo):
    """Add every halo chunk of ``halo (b*h, halo_rows, d)`` into the chunk it copies, in place
    and in a fixed order; returns the sorted rows ``(b*h, n*L, d)`` (a view)."""
    c, before = geo.c, geo.before
    main = halo[:, before * c:before * c + geo.rows]
    for j in [*range(before), *range(before + geo.chunks, before + geo.chunks + geo.after)]:
        chunk = (j - before) % geo.chunks
        main[:, chunk * c:(chunk + 1) * c] += halo[:, j * c:(j + 1) * c]
    return main


def _finite_rows(x):
    """``x (..., rows, d)`` with its non-finite rows zeroed in place, and the bool mask of them."""
    bad = torch.isfinite(x).all(dim=-1).logical_not_()
    return x.masked_fill_(bad.unsqueeze(-1), 0.0), bad


def _sum_rounds(sorted_rows, undo_flat, geo):
    """Sorted rows ``(b*h, n*L, d)`` -> ``(b, h, L, d)``: unsorted, every round's copy added."""
    unsorted = sorted_rows.reshape(geo.bh * geo.rows, geo.d).index_select(0, undo_flat)
    batch, heads, length, d = geo.shape
    unsorted = unsorted.view(batch, heads, geo.rounds, length, d)
    return unsorted[:, :, 0] if geo.rounds == 1 else unsorted.sum(dim=2)


class _SortedChunkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qk, keys, v, perm, undo, key_keep, logit_bias, dropout_keep, rate, chunk_length, before,
                after, causal):
        with torch.autocast(qk.device.type, enabled=False):
            return _forward(ctx, qk, keys, v, perm, undo, key_keep, logit_bias, dropout_keep, rate, chunk_length,
                            before, after, causal)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_result):
        with torch.autocast(d_result.device.type, enabled=False):
            return _backward(ctx, d_result)


def _forward(ctx, qk, keys, v, perm, undo, key_keep, logit_bias, dropout_keep, rate, chunk_length, before, after,
             causal):
    geo = _Geometry(qk, perm, chunk_length, before, after)
    device = qk.device
    offsets = torch.arange(geo.bh, device=device)[:, None]
    perm2, undo2 = perm.reshape(geo.bh, geo.rows), undo.reshape(geo.bh, geo.rows)
    pos = perm2 % geo.length  # original position of every sorted row
    pos_halo = pos[:, geo.halo_index(device)]
    flat = (pos + offsets * geo.length).reshape(-1)
    flat_halo = (pos_halo + offsets * geo.length).reshape(-1)
    keep_halo = None
    if key_keep is not None:
        heads = geo.shape[1]
        keep_halo = key_keep[:, None, :].expand(-1, heads, -1).reshape(-1).index_select(0, flat_halo)
        keep_halo = keep_halo.view(geo.bh, geo.halo_rows)
    window_rows = geo.width * geo.c

    def per_chunk(x):  # (b, h, chunks, c, window) -> (b*h, chunks, c, window)
        return None if x is None else x.reshape(geo.bh, geo.chunks, geo.c, window_rows)

    values, bad = _finite_rows(_gather_rows(v, flat_halo, geo, geo.halo_rows))
    saved = _Saved(_gather_rows(qk, flat, geo, geo.rows), _gather_rows(keys, flat_halo, geo, geo.halo_rows),
                   values, pos, pos_halo, keep_halo, per_chunk(logit_bias), per_chunk(dropout_keep), rate, causal,
                   bad.to(qk.dtype).unsqueeze(-1))
    out = torch.empty(geo.bh, geo.rows, geo.d, dtype=qk.dtype, device=device)
    lse = torch.empty(geo.bh, geo.rows, dtype=qk.dtype, device=device)
    work = _Workspace(qk.dtype, device)
    for block in geo.blocks:
        h0, h1, s, e = block
        probs, top = _block_probs(saved, geo, block, work)
        _chunks(lse, geo, h0, h1, s, e).copy_(_lse(probs, top))
        dropped, out_block = _dropped(probs, saved, block), _chunks(out, geo, h0, h1, s, e)
        _matmul(dropped, _window(saved.v, geo, h0, h1, s, e), out_block)
        reached = _matmul(dropped, _window(saved.bad, geo, h0, h1, s, e),
                          work.get("reached", out_block.shape[:-1] + (1,)))
        out_block.masked_fill_(reached > 0, float("nan"))
    undo_flat = (undo2 + offsets * geo.rows).reshape(-1)
    batch, heads, length, d = geo.shape
    outs = out.view(geo.bh * geo.rows, d).index_select(0, undo_flat).view(batch, heads, geo.rounds, length, d)
    lses = lse.view(-1).index_select(0, undo_flat).view(batch, heads, geo.rounds, length)
    ctx.geo, ctx.rate, ctx.causal = geo, rate, causal
    ctx.save_for_backward(saved.q, saved.k, saved.v, pos, pos_halo, keep_halo, saved.bias, saved.keep_drop,
                          perm2, undo_flat, outs, lses)
    result = combine_rounds(_xp(), outs, lses)
    return result.clone() if result._base is outs else result  # one round: never a view of a saved tensor


def _backward(ctx, d_result):
    geo = ctx.geo
    q, k, v, pos, pos_halo, keep_halo, bias, keep_drop, perm2, undo_flat, outs, lses = ctx.saved_tensors
    saved = _Saved(q, k, v, pos, pos_halo, keep_halo, bias, keep_drop, ctx.rate, ctx.causal)
    d_outs, d_lses = combine_rounds_backward(_xp(), outs, lses, d_result.contiguous())
    # d logits = P * (dP - rowsum(dO * O) + d lse): the shift per row, gathered to sorted order.
    shift = (d_outs * outs).sum(dim=-1)
    if d_lses is not None:
        shift = shift - d_lses
    offsets = torch.arange(geo.bh, device=q.device)[:, None]
    perm_flat = (perm2 + offsets * geo.rows).reshape(-1)
    shift = shift.reshape(-1).index_select(0, perm_flat).view(geo.bh, geo.rows)
    d_out = d_outs.reshape(-1, geo.d).index_select(0, perm_flat).view(geo.bh, geo.rows, geo.d)
    d_q = torch.empty_like(q)
    d_k, d_v = torch.zeros_like(k), torch.zeros_like(v)
    finite_k, _ = _finite_rows(k.clone())  # a masked NaN key must not reach d_q (d_logits is 0 there)
    work = _Workspace(q.dtype, q.device)
    for block in geo.blocks:
        h0, h1, s, e = block
        probs, _ = _block_probs(saved, geo, block, work)
        g = _chunks(d_out, geo, h0, h1, s, e)
        d_window = work.get("d_window", _block_shape(geo, block, geo.d)[:2] + (geo.width * geo.c, geo.d))
        dropped = _dropped(probs, saved, block, out=work.get("dropped", probs.shape))
        _add_windows(d_v, _matmul(dropped.transpose(-1, -2), g, d_window), geo, block)
        d_logits = _matmul(g, _window(v, geo, h0, h1, s, e).transpose(-1, -2), work.get("logits", probs.shape))
        d_logits = _dropped(d_logits, saved, block)
        # Masked logits have probability exactly 0, so only the self entries (a constant that can
        # carry all the mass) are zeroed explicitly.
        d_logits.sub_(_chunks(shift, geo, h0, h1, s, e)[..., None]).mul_(probs)
        _fill_self(d_logits, saved, geo, block, 0.0)
        _matmul(d_logits, _window(finite_k, geo, h0, h1, s, e), _chunks(d_q, geo, h0, h1, s, e))
        _add_windows(d_k, _matmul(d_logits.transpose(-1, -2), _chunks(q, geo, h0, h1, s, e), d_window), geo, block)
    d_qk = _sum_rounds(d_q, undo_flat, geo)
    d_keys = _sum_rounds(_fold_halo(d_k, geo), undo_flat, geo)
    d_values = _sum_rounds(_fold_halo(d_v, geo), undo_flat, geo)
    return d_qk, d_keys, d_values, None, None, None, None, None, None, None, None, None, None


def _xp():
    from array_api_compat import torch as xp

    return xp
