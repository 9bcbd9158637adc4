"""The fast path of LSH attention on torch: sorted-chunk attention as one ``autograd.Function``.

The core (``reformer_core/_attention/lsh.py``) hashes and sorts; this module does the hot
step that follows, with the core's exact semantics (``attend``: bias, then causal/padding
masks replaced by -1e9, then the self mask by -1e5, an explicitly normalised softmax, the
log-sum-exp per row, then ``combine_rounds``), but laid out for speed and memory:

* chunks are processed in blocks (one batch x head row, a run of chunks) whose logits stay
  under :data:`BLOCK_BYTES`; each block gathers its query rows and the rows of its window
  chunks (``num_chunks_before`` back, ``num_chunks_after`` ahead, wrapping) into buffers
  reused by every block and kept for the next call (per thread; :func:`release_workspace`), and every chunk's window is an overlapping ``as_strided`` view of those rows,
  never a copy (``bmm`` reads it in place);
* masks are compared from positions per block and filled in place (a padding key carries
  a position past every query, so one comparison makes the causal and the padding mask);
* the forward keeps only its inputs (``qk``, the keys, the values), index vectors and the
  per-round outputs and log-sum-exps, nothing in sorted order; the backward recomputes each
  block's probabilities (flash-style), so memory is O(length) per layer, not
  O(length x window);
* results are written to per-round rows with ``index_copy_`` and gradients added to the
  input rows with an accumulating ``index_put_``, block after block (deterministic on the
  CPU; on CUDA the Triton kernel, ``triton_lsh.py``, runs when it can).

Autocast is switched off inside, and 16-bit inputs are computed in float32 (the core's
``logits_dtype``): the mask constants always fit the logits, and the result comes back in the
input dtype. Value rows holding NaN or inf are zeroed for the products and the queries that
attend to one with a nonzero probability get NaN outputs, as in the core's ``attend``: a
masked position never leaks into an output.
"""

from __future__ import annotations

import threading

import torch

from reformer_core._attention.attend import mask_values, shared_qk_keys
from reformer_core._attention.rounds import combine_rounds_backward, round_weights

__all__ = ["lsh_chunk_attention", "release_workspace", "BLOCK_BYTES"]

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
    result = _SortedChunkAttention.apply(qk.to(wide), keys.to(wide), v.to(wide), perm, key_keep, logit_bias,
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
        self.window_rows = self.width * chunk_length
        per_chunk = chunk_length * self.window_rows * qk.element_size()
        per_block = max(1, BLOCK_BYTES // per_chunk)
        # One (batch, head) row per block, so every product is a 3-D bmm over window views.
        self.blocks = [(h, s, min(s + per_block, self.chunks))
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


class _Indices:
    """Index vectors of one call, all ``(b*h, ...)``: where each sorted row and halo row lives.

    ``flat``/``flat_halo`` index rows of ``(b*h*L, d)`` inputs; ``out_index`` indexes rows of
    the per-round outputs ``(b*h*n*L, d)``; ``pos``/``pos_halo`` are original positions and
    ``key_pos`` the positions the causal/padding comparison uses (padding keys sit past every
    query), or None without a mask.
    """

    def __init__(self, geo, perm, key_keep, causal):
        device = perm.device
        offsets = torch.arange(geo.bh, device=device)[:, None]
        perm2 = perm.reshape(geo.bh, geo.rows)
        self.pos = perm2 % geo.length
        halo = geo.halo_index(device)
        self.pos_halo = self.pos[:, halo]
        self.flat = self.pos + offsets * geo.length
        self.flat_halo = self.flat[:, halo]
        self.out_index = perm2 + offsets * geo.rows
        self.key_pos = self.pos_halo if causal else None
        if key_keep is not None:
            heads = geo.shape[1]
            keep = key_keep[:, None, :].expand(-1, heads, -1).reshape(-1)[self.flat_halo]
            far = torch.full_like(self.pos_halo, geo.length)  # after every query: masked by "key > query"
            self.key_pos = torch.where(keep, self.pos_halo, far)
            self.pad_only = not causal
        else:
            self.pad_only = False

    def tensors(self):
        return self.pos, self.pos_halo, self.flat, self.flat_halo, self.out_index, self.key_pos

    @classmethod
    def from_tensors(cls, tensors, pad_only):
        self = cls.__new__(cls)
        self.pos, self.pos_halo, self.flat, self.flat_halo, self.out_index, self.key_pos = tensors
        self.pad_only = pad_only
        return self


class _Workspace:
    """Buffers reused by every block of a call, and by later calls (:func:`_workspace`): fresh
    large tensors cost page faults, which on some machines (virtual machines, memory under
    pressure) take longer than the arithmetic that fills them."""

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


_WORKSPACES = threading.local()


def _workspace(dtype, device):
    """This thread's workspace for ``(dtype, device)``, kept between calls (a few blocks' worth
    of buffers, bounded by :data:`BLOCK_BYTES`; :func:`release_workspace` frees it). While
    ``torch.compile`` traces, a fresh one (the compiler plans the graph's memory)."""
    if torch.compiler.is_compiling():
        return _Workspace(dtype, device)
    spaces = _WORKSPACES.__dict__.setdefault("spaces", {})
    key = (dtype, str(device))
    if key not in spaces:
        spaces[key] = _Workspace(dtype, device)
    return spaces[key]


def release_workspace() -> None:
    """Free the buffers this thread's kernel calls keep for their next call."""
    _WORKSPACES.__dict__.pop("spaces", None)


class _Block:
    """One block: chunks ``s:e`` of (batch x head) row ``h``, its rows gathered into buffers."""

    def __init__(self, geo, index, block, work, qk, keys, values):
        """``qk``, ``keys``, ``values``: ``(b, h, L, d)`` in any strides (rows are gathered from
        the (batch, head) row's ``(L, d)`` view: no contiguous copy of a permuted input)."""
        self.h, self.s, self.e = h, s, e = block
        self.m = e - s
        c, d = geo.c, geo.d
        self.geo = geo
        self.query_rows = index.flat[h, s * c:e * c]
        self.halo_rows = index.flat_halo[h, s * c:(e + geo.width - 1) * c]
        self.out_rows = index.out_index[h, s * c:e * c]
        b, head = divmod(h, geo.shape[1])
        query_pos, halo_pos = index.pos[h, s * c:e * c], index.pos_halo[h, s * c:(e + geo.width - 1) * c]
        q = torch.index_select(qk[b, head], 0, query_pos, out=work.get("q", (self.m * c, d)))
        self.q = q.view(self.m, c, d)
        self.k = torch.index_select(keys[b, head], 0, halo_pos, out=work.get("k", (halo_pos.numel(), d)))
        self.v = torch.index_select(values[b, head], 0, halo_pos, out=work.get("v", (halo_pos.numel(), d)))

    def window(self, rows):
        """Overlapping windows ``(m, window_rows, ...)`` of this block's halo rows ``rows``."""
        tail, tail_strides = tuple(rows.shape[1:]), tuple(rows.stride()[1:])
        return rows.as_strided((self.m, self.geo.window_rows, *tail),
                               (self.geo.c * rows.stride(0), rows.stride(0), *tail_strides))

    def chunks(self, x):
        """Sorted rows ``x (b*h, n*L, ...)`` of this block's chunks as ``(m, c, ...)``."""
        part = x[self.h, self.s * self.geo.c:self.e * self.geo.c]
        return part.view(self.m, self.geo.c, *part.shape[1:])

    def window_products(self, target, weights, rows):
        """Set ``target ((m + width - 1) * c, d)`` to the window-shaped product ``weights^T @ rows``
        (``weights (m, c, window_rows)``, ``rows (m, c, d)``) summed into the halo rows each slot
        holds: slot 0 writes its rows, the other slots add inside the matmul (``baddbmm_``), no
        window-shaped temporary and no zeroing pass but over the last ``width - 1`` chunks."""
        c, m = self.geo.c, self.m
        for k in range(self.geo.width):
            slot = weights[..., k * c:(k + 1) * c].transpose(-1, -2)
            part = target[k * c:(k + m) * c].view(m, c, -1)
            if k == 0:
                torch.bmm(slot, rows, out=part)
                target[m * c:].zero_()
            else:
                part.baddbmm_(slot, rows)
        return target


def _block_logits(block, index, bias, work):
    """Masked logits ``(m, c, window_rows)`` of one block (a workspace buffer): ``q k^T (+ bias)``,
    causal/padding entries set to the mask value."""
    geo, h = block.geo, block.h
    shape = (block.m, geo.c, geo.window_rows)
    logits = torch.bmm(block.q, block.window(block.k).transpose(-1, -2), out=work.get("logits", shape))
    if bias is not None:
        logits += bias[h, block.s:block.e]
    mask_value = mask_values(torch, logits.dtype)[0]
    if index.key_pos is not None:
        key_pos = block.window(index.key_pos[h, block.s * geo.c:(block.e + geo.width - 1) * geo.c])
        if index.pad_only:  # padding only: a key is masked for every query
            logits.masked_fill_((key_pos >= geo.length)[:, None, :], mask_value)
        else:
            query_pos = block.chunks(index.pos)[..., None]
            logits.masked_fill_(torch.gt(key_pos[:, None, :], query_pos, out=work.get("masked", shape, torch.bool)),
                                mask_value)
    return logits


def _block_probs(block, index, bias, work, with_lse=True):
    """Probabilities ``(m, c, window_rows)`` of one block (a workspace buffer) and, with
    ``with_lse``, its rows' log-sum-exp ``(m, c, 1)`` (``top - log(max p)``: exact to rounding,
    never the log of a tiny sum); the backward's recompute needs the probabilities only."""
    logits = _block_logits(block, index, bias, work)
    _fill_self(logits, block, index, mask_values(torch, logits.dtype)[1])
    top = logits.amax(dim=-1, keepdim=True) if with_lse else None
    probs = torch.ops.aten._softmax.out(logits, -1, False, out=work.get("probs", logits.shape))
    return probs, (top - torch.log(probs.amax(dim=-1, keepdim=True)) if with_lse else None)


def _fill_self(x, block, index, value):
    """Set the entries of ``x (m, c, window_rows)`` where a query meets its own position to ``value``.

    Every query sees itself on the diagonal of its own chunk (a strided view, no mask); another
    copy of its position can only sit in a window chunk of another hashing round, or in its own
    chunk again when the window wraps round a short sequence: :attr:`_Geometry.cross`.
    """
    geo, h, s = block.geo, block.h, block.s
    c, own = geo.c, geo.before
    x[..., own * c:(own + 1) * c].diagonal(dim1=-2, dim2=-1).fill_(value)
    for chunk, k in (pair for pair in geo.cross if s <= pair[0] < block.e):
        query_pos = index.pos[h, chunk * c:(chunk + 1) * c]
        key_pos = index.pos_halo[h, (chunk + k) * c:(chunk + k + 1) * c]
        x[chunk - s, :, k * c:(k + 1) * c].masked_fill_(key_pos[None, :] == query_pos[:, None], value)


def _dropped(probs, keep_drop, rate, block, out=None):
    """``dropout(probs)`` as the core's ``dropout``: kept entries times ``1 / (1 - rate)``, in
    place or into ``out``."""
    if keep_drop is None or rate == 0.0:
        return probs
    drop = torch.logical_not(keep_drop[block.h, block.s:block.e])
    if out is None:
        return probs.mul_(1.0 / (1.0 - rate)).masked_fill_(drop, 0.0)
    return torch.mul(probs, 1.0 / (1.0 - rate), out=out).masked_fill_(drop, 0.0)


def _bad_rows(x):
    """Bool mask ``x.shape[:-1]`` of the rows of ``x`` holding NaN or inf, or None when every
    entry is finite. The common case costs one reduction (a non-finite sum; a sum that merely
    overflows takes the exact check too) and no input-sized mask; while ``torch.compile``
    traces, always the mask (no data-dependent branch)."""
    if not torch.compiler.is_compiling() and bool(torch.isfinite(x.sum())):
        return None
    return torch.isfinite((x * 0).sum(dim=-1)).logical_not_()  # NaN exactly where a row holds NaN or inf


def _finite(x):
    """``(x with its non-finite rows zeroed, bool mask of them or None)``; ``x (..., d)``."""
    bad = _bad_rows(x)
    return (x, None) if bad is None else (x.masked_fill(bad.unsqueeze(-1), 0.0), bad)


class _SortedChunkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qk, keys, v, perm, key_keep, logit_bias, dropout_keep, rate, chunk_length, before, after,
                causal):
        with torch.autocast(qk.device.type, enabled=False):
            return _forward(ctx, qk, keys, v, perm, key_keep, logit_bias, dropout_keep, rate, chunk_length, before,
                            after, causal)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_result):
        with torch.autocast(d_result.device.type, enabled=False):
            return _backward(ctx, d_result)


def _per_chunk(x, geo):  # (b, h, chunks, c, window) -> (b*h, chunks, c, window)
    return None if x is None else x.reshape(geo.bh, geo.chunks, geo.c, geo.window_rows)


def _forward(ctx, qk, keys, v, perm, key_keep, logit_bias, dropout_keep, rate, chunk_length, before, after, causal):
    geo = _Geometry(qk, perm, chunk_length, before, after)
    index = _Indices(geo, perm, key_keep, causal)
    bias, keep_drop = _per_chunk(logit_bias, geo), _per_chunk(dropout_keep, geo)
    d = geo.d
    values, bad = _finite(v)  # bad: None when every value is finite (no bookkeeping then)
    if bad is not None:
        bad_halo = bad.reshape(-1).to(qk.dtype)[index.flat_halo].unsqueeze(-1)  # (b*h, halo_rows, 1)
    outs = torch.empty(geo.bh * geo.rows, d, dtype=qk.dtype, device=qk.device)
    lses = torch.empty(geo.bh * geo.rows, dtype=qk.dtype, device=qk.device)
    work = _workspace(qk.dtype, qk.device)
    for spec in geo.blocks:
        block = _Block(geo, index, spec, work, qk, keys, values)
        probs, lse = _block_probs(block, index, bias, work)
        lses.index_copy_(0, block.out_rows, lse.view(-1))
        dropped = _dropped(probs, keep_drop, rate, block)
        out = torch.bmm(dropped, block.window(block.v), out=work.get("out", (block.m, geo.c, d)))
        if bad is not None:
            halo_bad = bad_halo[block.h, block.s * geo.c:(block.e + geo.width - 1) * geo.c]
            reached = torch.bmm(dropped, block.window(halo_bad), out=work.get("reached", (block.m, geo.c, 1)))
            out.masked_fill_(reached > 0, float("nan"))
        outs.index_copy_(0, block.out_rows, out.view(-1, d))
    batch, heads, length, _ = geo.shape
    outs = outs.view(batch, heads, geo.rounds, length, d)
    lses = lses.view(batch, heads, geo.rounds, length)
    ctx.geo, ctx.rate, ctx.causal, ctx.pad_only = geo, rate, causal, index.pad_only
    ctx.save_for_backward(qk, keys, values, bad, bias, keep_drop, outs, lses, *index.tensors())
    return _combine_rounds(outs, lses)


def _combine_rounds(outs, lses):
    """The core's ``combine_rounds`` without an ``outs``-sized temporary: the weighted rounds
    are added into the result one after another (a fresh tensor, never a view of ``outs``)."""
    if outs.shape[2] == 1:
        return outs[:, :, 0].clone()
    weights = round_weights(_xp(), lses)[..., None]
    result = outs[:, :, 0] * weights[:, :, 0]
    for r in range(1, outs.shape[2]):
        result.addcmul_(outs[:, :, r], weights[:, :, r])
    return result


def _round_gradients(outs, lses, d_result):
    """``(weights, shift)`` per (batch x head, round, position) row, both ``(rows, 1)``:
    ``d_outs = weights * d_result`` (never materialised: each block scales its own rows) and
    ``shift = rowsum(d_outs * outs) - d_lse``, the backward of ``combine_rounds`` folded into
    the attention's. ``weights`` is None for one round."""
    if outs.shape[2] == 1:
        return None, torch.linalg.vecdot(outs[:, :, 0], d_result).reshape(-1, 1)
    weights = round_weights(_xp(), lses)
    d_weights = torch.linalg.vecdot(outs, d_result[:, :, None])  # (b, h, n, L)
    d_lses = weights * (d_weights - (weights * d_weights).sum(dim=2, keepdim=True))
    return weights.reshape(-1, 1), (weights * d_weights - d_lses).reshape(-1, 1)


def _backward(ctx, d_result):
    geo, d = ctx.geo, ctx.geo.d
    qk, keys, values, bad, bias, keep_drop, outs, lses, *index_tensors = ctx.saved_tensors
    index = _Indices.from_tensors(index_tensors, ctx.pad_only)
    d_result = d_result.contiguous()
    # d logits = P * (dP - rowsum(dO * O) + d lse): the shift per row, in per-round order.
    if bad is None:  # no value was non-finite: no output row is NaN by the forward's doing
        weights, shift = _round_gradients(outs, lses, d_result)
        d_rows = d_result.reshape(-1, d)  # a block takes its queries' rows, times their round weights
    else:
        # Rows the forward set to NaN (they met a non-finite value) pass no gradient to their
        # probabilities, as through the core's ``where``.
        d_outs, d_lses = combine_rounds_backward(_xp(), outs, lses, d_result)
        poisoned = torch.isnan(outs).any(dim=-1)
        d_outs = d_outs.masked_fill(poisoned.unsqueeze(-1), 0.0)
        shift = (d_outs * outs).sum(dim=-1).masked_fill_(poisoned, 0.0)
        if d_lses is not None:
            shift = shift - d_lses
        weights, shift, d_rows = None, shift.reshape(-1, 1), d_outs.reshape(-1, d)
    bad_keys = _bad_rows(keys)
    if bad_keys is not None:
        bad_keys = bad_keys.reshape(-1)  # (b*h*L,)
    # Gradients go straight to the input rows: each block adds its rows with an accumulating
    # index_put_, one block after another (serial, so deterministic, on the CPU; on CUDA as
    # deterministic as torch.use_deterministic_algorithms makes it, and the Triton kernel is
    # the CUDA path). Nothing of size rounds x length is kept.
    d_qk, d_keys, d_values = (qk.new_zeros(geo.bh * geo.length, d) for _ in range(3))
    work = _workspace(qk.dtype, qk.device)
    for spec in geo.blocks:
        block = _Block(geo, index, spec, work, qk, keys, values)
        # Recomputed as the forward computed them (explicitly normalised): exp(logits - lse) loses up to
        # ulp(1e5) of the mass in float32 where the -1e5 self value is a row's largest logit.
        probs, _ = _block_probs(block, index, bias, work, with_lse=False)
        g_buffer = work.get("g", (block.m * geo.c, d))
        if bad is None:
            g = torch.index_select(d_rows, 0, block.query_rows, out=g_buffer)
            if weights is not None:
                g.mul_(torch.index_select(weights, 0, block.out_rows, out=work.get("w", (block.m * geo.c, 1))))
        else:
            g = torch.index_select(d_rows, 0, block.out_rows, out=g_buffer)
        g = g.view(block.m, geo.c, d)
        row_shift = torch.index_select(shift, 0, block.out_rows, out=work.get("shift", (block.m * geo.c, 1)))
        d_halo = work.get("d_halo", (block.halo_rows.numel(), d))
        dropped = _dropped(probs, keep_drop, ctx.rate, block, out=work.get("dropped", probs.shape))
        block.window_products(d_halo, dropped, g)
        d_values.index_put_((block.halo_rows,), d_halo, accumulate=True)
        d_logits = work.get("d_logits", probs.shape)
        v_windows = block.window(block.v).transpose(-1, -2)
        if keep_drop is None or ctx.rate == 0.0:  # dP - shift in the product itself
            torch.baddbmm(row_shift.view(block.m, geo.c, 1), g, v_windows, beta=-1, out=d_logits)
        else:
            _dropped(torch.bmm(g, v_windows, out=d_logits), keep_drop, ctx.rate, block)
            d_logits.sub_(row_shift.view(block.m, geo.c, 1))
        # Masked logits have probability exactly 0, so only the self entries (a constant that can
        # carry all the mass) are zeroed explicitly.
        d_logits.mul_(probs)
        _fill_self(d_logits, block, index, 0.0)
        if bad_keys is not None:  # a masked NaN key must not reach d_q
            block.k.masked_fill_(bad_keys[block.halo_rows].unsqueeze(-1), 0.0)
        d_q = torch.bmm(d_logits, block.window(block.k), out=work.get("d_q", (block.m, geo.c, d)))
        d_qk.index_put_((block.query_rows,), d_q.view(-1, d), accumulate=True)
        block.window_products(d_halo, d_logits, block.q)
        d_keys.index_put_((block.halo_rows,), d_halo, accumulate=True)
    if bad is not None:
        d_values.masked_fill_(bad.reshape(-1, 1), 0.0)  # the forward read those rows as zeros
    shape = geo.shape
    return (d_qk.view(shape), d_keys.view(shape), d_values.view(shape), None, None, None, None, None, None, None,
            None, None)


def _xp():
    from array_api_compat import torch as xp

    return xp
