"""Sorted-chunk LSH attention as Triton kernels (forward and backward), for torch CUDA tensors.

The same step as :mod:`lsh_kernel` (the core hashes and sorts; this does the chunked
attention, the per-row log-sum-exp and the round combination) with the core's semantics
(``attend``): logits ``q . k``, plus ``logit_bias``; causal (key position > query position)
and padding keys replaced by ``mask_values(...)[0]``; then, after those, every entry where a
query meets its own position (in any round's copy) replaced by the self value; a softmax;
dropout on the probabilities; ``combine_rounds`` over the hashing rounds.

Kernels (one program per (batch*head, chunk); rows of a chunk and the head dimension are
padded to powers of two, at least 16 for ``tl.dot``, with load/store masks):

* forward: query chunk ``i`` loops over its window, key chunk ``j = (i + w - before) mod
  chunks`` for ``w < before + 1 + after``, with an online (flash-style) softmax; masks are
  compared from positions in registers (no mask arrays, no halo copies). It writes the output
  and, per row, the running maximum ``m`` and the total ``l`` of ``exp(logit - m)``;
* backward, ``dq``: query chunk ``i`` again loops over its window, recomputing
  ``p = exp(logit - m) / l`` (``m`` and ``l`` are kept apart, not as ``lse = m + log l``: when
  the self value -1e5 is a row's largest logit, float32 ``lse`` would lose ``ulp(1e5)``);
* backward, ``dk``/``dv``: key chunk ``j`` loops over the query chunks whose window holds it,
  ``i = (j + before - w) mod chunks``, so every gradient row is written by one program:
  deterministic, no atomics.

Accumulation is float32 (float64 for float64 inputs), the core's logits dtype. 16-bit
products run on tensor cores (probabilities rounded to the input dtype before the product with
the values, as flash attention does); float32 products use 3xTF32, or TF32 where torch allows
it (:func:`_dot_precision`). ``logit_bias`` (duplicate correction) and the dropout keep mask
are read inside the kernels, one ``(chunk, window)`` tile per step, so every case of the core
runs here and the torch-op kernel is never needed as a fallback. Non-finite value rows follow
the core's rule: read as zeros, and a query that gives one a nonzero probability gets NaN.

The dispatch (``TorchBackend.lsh_chunk_attention``) uses this on CUDA tensors of float16,
bfloat16 and float32 when Triton imports (float64 keeps the torch-op kernel, since ``tl.dot``
in float64 is not available on every GPU). With ``TRITON_INTERPRET=1`` set before this module
is imported, Triton's interpreter runs the same kernels on CPU tensors; the tests do that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reformer_core._attention.attend import mask_values, shared_qk_keys
from reformer_core._attention.rounds import combine_rounds, combine_rounds_backward

__all__ = ["lsh_chunk_attention", "supports", "interpreted"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(qk) -> bool:
    """Whether the dispatch should run these kernels for ``qk``: CUDA, a non-float64 dtype."""
    return qk.device.type == "cuda" and qk.dtype in KERNEL_DTYPES


def interpreted() -> bool:
    """Whether the kernels were built for Triton's interpreter (``TRITON_INTERPRET=1`` when this
    module was imported): then they take CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_forward_kernel, InterpretedFunction)


def lsh_chunk_attention(qk, v, perm, undo, *, key_keep, logit_bias, dropout_keep, dropout_rate, chunk_length,
                        num_chunks_before, num_chunks_after, causal):
    """Sorted-chunk attention and round combination for sorted ``perm``/``undo`` ``(b, h, n*L)``.

    The signature and result of :func:`lsh_kernel.lsh_chunk_attention`: ``qk``, ``v``
    ``(b, h, L, d)``; ``key_keep`` bool ``(b, L)`` or None; ``logit_bias``/``dropout_keep``
    ``(b, h, n*L // chunk_length, chunk_length, window)`` or None. Returns ``(b, h, L, d)``,
    differentiable in ``qk`` and ``v``.
    """
    from array_api_compat import torch as xp

    keys = shared_qk_keys(xp, qk)  # autograd differentiates the key normalisation itself
    return _TritonChunkAttention.apply(qk, keys, v, perm, undo, key_keep, logit_bias, dropout_keep,
                                       float(dropout_rate), int(chunk_length), int(num_chunks_before),
                                       int(num_chunks_after), bool(causal))


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _rows(ptr, bh, chunk, r, dd, C: tl.constexpr, D: tl.constexpr, rows, mask):
    """The ``(BLOCK, BLOCK_D)`` tile of chunk ``chunk`` of ``ptr (bh, rows, D)``."""
    return tl.load(ptr + bh * rows * D + (chunk * C + r)[:, None] * D + dd[None, :], mask=mask, other=0.0)


@triton.jit
def _per_row(ptr, bh, chunk, r, C: tl.constexpr, rows, mask, other):
    """The ``(BLOCK,)`` values of chunk ``chunk`` of ``ptr (bh, rows)``."""
    return tl.load(ptr + bh * rows + chunk * C + r, mask=mask, other=other)


@triton.jit
def _window_tile(ptr, bh, i, w, num_chunks, r, c, C: tl.constexpr, WIDTH: tl.constexpr, mask, other):
    """Window slot ``w`` of query chunk ``i`` of ``ptr (bh, chunks, C, WIDTH * C)``."""
    base = ptr + ((bh * num_chunks + i) * C) * (WIDTH * C) + w * C
    return tl.load(base + r[:, None] * (WIDTH * C) + c[None, :], mask=mask, other=other)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, DOT: tl.constexpr):
    """``a @ b`` with operands in ``DOT`` (the input dtype; float32 for bfloat16 in the
    interpreter, whose bfloat16 ``tl.dot`` is wrong), accumulated in float32 or wider."""
    return tl.dot(a.to(DOT), b.to(DOT), input_precision=PRECISION)


@triton.jit
def _finite(x):
    """``x`` with its non-finite rows zeroed, and the bool mask of those rows (NaN or inf values
    and keys are read as zeros, as the core's ``finite_rows`` does)."""
    bad = tl.max(tl.where((x == x) & (tl.abs(x) < float("inf")), 0, 1), 1) > 0
    return tl.where(bad[:, None], 0.0, x).to(x.dtype), bad


@triton.jit
def _scores(q, k, pos_q, pos_k, keep_k, bias, col_ok, mask_value, self_value, CAUSAL: tl.constexpr,
            HAS_KEEP: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
            DOT: tl.constexpr):
    """Masked logits of one (query chunk, key chunk) tile in ``ACC``, padded key columns -inf,
    and where a logit was replaced by a constant or is padding (no gradient flows there)."""
    s = _dot(q, tl.trans(k), PRECISION, DOT).to(ACC)
    if HAS_BIAS:
        s += bias.to(ACC)
    is_self = pos_k[None, :] == pos_q[:, None]
    replaced = is_self
    if CAUSAL:
        later = pos_k[None, :] > pos_q[:, None]
        s = tl.where(later, mask_value, s)
        replaced = replaced | later
    if HAS_KEEP:
        padding = keep_k[None, :] == 0
        s = tl.where(padding, mask_value, s)
        replaced = replaced | padding
    s = tl.where(is_self, self_value, s)  # after the other masks, as the core does
    s = tl.where(col_ok[None, :], s, float("-inf"))
    return s, replaced | (col_ok[None, :] == 0)  # padded columns too: no 0 * NaN from a NaN shift


@triton.jit
def _forward_kernel(Q, K, V, POS, KEEP, BIAS, DROP, OUT, M, L, num_chunks, wrap, mask_value, self_value, drop_scale,
                    C: tl.constexpr, D: tl.constexpr, BEFORE: tl.constexpr, WIDTH: tl.constexpr,
                    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_DROP: tl.constexpr, ACC: tl.constexpr,
                    PRECISION: tl.constexpr, DOT: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = num_chunks * C
    r = tl.arange(0, BLOCK)
    dd = tl.arange(0, BLOCK_D)
    row_ok = r < C
    tile_ok = row_ok[:, None] & (dd < D)[None, :]
    q = _rows(Q, bh, i, r, dd, C, D, rows, tile_ok)
    # Padded rows get position -1 and a zero query: finite logits, never stored.
    pos_q = _per_row(POS, bh, i, r, C, rows, row_ok, -1)
    m = tl.full([BLOCK], float("-inf"), ACC)
    total = tl.zeros([BLOCK], ACC)
    acc = tl.zeros([BLOCK, BLOCK_D], ACC)
    bad_top = tl.full([BLOCK], float("-inf"), ACC)  # the largest logit on a non-finite value row
    square_ok = row_ok[:, None] & row_ok[None, :]
    for w in tl.static_range(WIDTH):
        j = (i + w - BEFORE + wrap) % num_chunks
        k = _rows(K, bh, j, r, dd, C, D, rows, tile_ok)
        pos_k = _per_row(POS, bh, j, r, C, rows, row_ok, -2)
        keep_k = _per_row(KEEP, bh, j, r, C, rows, row_ok, 1) if HAS_KEEP else 0
        bias = _window_tile(BIAS, bh, i, w, num_chunks, r, r, C, WIDTH, square_ok, 0.0) if HAS_BIAS else 0
        s, _ = _scores(q, k, pos_q, pos_k, keep_k, bias, row_ok, mask_value, self_value,
                       CAUSAL, HAS_KEEP, HAS_BIAS, ACC, PRECISION, DOT)
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        vj, bad_v = _finite(_rows(V, bh, j, r, dd, C, D, rows, tile_ok))
        on_bad = bad_v[None, :]
        if HAS_DROP:
            keep_drop = _window_tile(DROP, bh, i, w, num_chunks, r, r, C, WIDTH, square_ok, 0)
            p = tl.where(keep_drop != 0, p * drop_scale, 0.0)
            on_bad = on_bad & (keep_drop != 0)
        bad_top = tl.maximum(bad_top, tl.max(tl.where(on_bad, s, float("-inf")), 1))
        acc = acc * alpha[:, None] + _dot(p.to(vj.dtype), vj, PRECISION, DOT).to(ACC)
        m = m_new
    # A query whose final probability of a non-finite value row is nonzero gets NaN (the core's
    # rule: garbage never becomes a finite wrong number, and masked garbage never leaks).
    reached = tl.exp(bad_top - m) / total > 0
    out = tl.where(reached[:, None], float("nan"), acc / total[:, None])
    tl.store(OUT + bh * rows * D + (i * C + r)[:, None] * D + dd[None, :], out.to(OUT.dtype.element_ty),
             mask=tile_ok)
    tl.store(M + bh * rows + i * C + r, m, mask=row_ok)
    tl.store(L + bh * rows + i * C + r, total, mask=row_ok)


@triton.jit
def _dq_kernel(Q, K, V, POS, KEEP, BIAS, DROP, M, L, DO, SHIFT, DQ, num_chunks, wrap, mask_value, self_value,
               drop_scale, C: tl.constexpr, D: tl.constexpr, BEFORE: tl.constexpr, WIDTH: tl.constexpr,
               BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_DROP: tl.constexpr, ACC: tl.constexpr,
               PRECISION: tl.constexpr, DOT: tl.constexpr):
    """``dq`` of query chunk ``i``: ``sum_w dS_w @ K_j`` with ``dS = P * (dP - shift)``."""
    i = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = num_chunks * C
    r = tl.arange(0, BLOCK)
    dd = tl.arange(0, BLOCK_D)
    row_ok = r < C
    tile_ok = row_ok[:, None] & (dd < D)[None, :]
    square_ok = row_ok[:, None] & row_ok[None, :]
    q = _rows(Q, bh, i, r, dd, C, D, rows, tile_ok)
    g = _rows(DO, bh, i, r, dd, C, D, rows, tile_ok)
    pos_q = _per_row(POS, bh, i, r, C, rows, row_ok, -1)
    m = _per_row(M, bh, i, r, C, rows, row_ok, 0.0)
    total = _per_row(L, bh, i, r, C, rows, row_ok, 1.0)
    shift = _per_row(SHIFT, bh, i, r, C, rows, row_ok, 0.0)
    dq = tl.zeros([BLOCK, BLOCK_D], ACC)
    for w in tl.static_range(WIDTH):
        j = (i + w - BEFORE + wrap) % num_chunks
        k = _rows(K, bh, j, r, dd, C, D, rows, tile_ok)
        vj, _ = _finite(_rows(V, bh, j, r, dd, C, D, rows, tile_ok))
        pos_k = _per_row(POS, bh, j, r, C, rows, row_ok, -2)
        keep_k = _per_row(KEEP, bh, j, r, C, rows, row_ok, 1) if HAS_KEEP else 0
        bias = _window_tile(BIAS, bh, i, w, num_chunks, r, r, C, WIDTH, square_ok, 0.0) if HAS_BIAS else 0
        s, replaced = _scores(q, k, pos_q, pos_k, keep_k, bias, row_ok, mask_value, self_value,
                              CAUSAL, HAS_KEEP, HAS_BIAS, ACC, PRECISION, DOT)
        p = tl.exp(s - m[:, None]) / total[:, None]
        dp = _dot(g, tl.trans(vj), PRECISION, DOT).to(ACC)
        if HAS_DROP:
            keep_drop = _window_tile(DROP, bh, i, w, num_chunks, r, r, C, WIDTH, square_ok, 0)
            dp = tl.where(keep_drop != 0, dp * drop_scale, 0.0)
        ds = tl.where(replaced, 0.0, p * (dp - shift[:, None]))
        finite_k, _ = _finite(k)  # a masked NaN key must not reach dq
        dq += _dot(ds.to(k.dtype), finite_k, PRECISION, DOT).to(ACC)
    tl.store(DQ + bh * rows * D + (i * C + r)[:, None] * D + dd[None, :], dq.to(DQ.dtype.element_ty),
             mask=tile_ok)


@triton.jit
def _dkdv_kernel(Q, K, V, POS, KEEP, BIAS, DROP, M, L, DO, SHIFT, DK, DV, num_chunks, wrap, mask_value, self_value,
                 drop_scale, C: tl.constexpr, D: tl.constexpr, BEFORE: tl.constexpr, WIDTH: tl.constexpr,
                 BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_DROP: tl.constexpr, ACC: tl.constexpr,
                 PRECISION: tl.constexpr, DOT: tl.constexpr):
    """``dk``/``dv`` of key chunk ``j``, summed over the window slots that hold it, in order."""
    j = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = num_chunks * C
    r = tl.arange(0, BLOCK)
    dd = tl.arange(0, BLOCK_D)
    row_ok = r < C
    tile_ok = row_ok[:, None] & (dd < D)[None, :]
    square_ok = row_ok[:, None] & row_ok[None, :]
    k = _rows(K, bh, j, r, dd, C, D, rows, tile_ok)
    vj, _ = _finite(_rows(V, bh, j, r, dd, C, D, rows, tile_ok))
    pos_k = _per_row(POS, bh, j, r, C, rows, row_ok, -2)
    keep_k = _per_row(KEEP, bh, j, r, C, rows, row_ok, 1) if HAS_KEEP else 0
    dk = tl.zeros([BLOCK, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK, BLOCK_D], ACC)
    for w in tl.static_range(WIDTH):
        i = (j - w + BEFORE + wrap) % num_chunks  # the query chunk whose slot w is chunk j
        q = _rows(Q, bh, i, r, dd, C, D, rows, tile_ok)
        g = _rows(DO, bh, i, r, dd, C, D, rows, tile_ok)
        pos_q = _per_row(POS, bh, i, r, C, rows, row_ok, -1)
        m = _per_row(M, bh, i, r, C, rows, row_ok, 0.0)
        total = _per_row(L, bh, i, r, C, rows, row_ok, 1.0)
        shift = _per_row(SHIFT, bh, i, r, C, rows, row_ok, 0.0)
        bias = _window_tile(BIAS, bh, i, w, num_chunks, r, r, C, WIDTH, square_ok, 0.0) if HAS_BIAS else 0
        s, replaced = _scores(q, k, pos_q, pos_k, keep_k, bias, row_ok, mask_value, self_value,
                              CAUSAL, HAS_KEEP, HAS_BIAS, ACC, PRECISION, DOT)
        p = tl.exp(s - m[:, None]) / total[:, None]  # padded columns: exp(-inf) = 0
        # (padded query rows have zero q and dO, so they add nothing below)
        dp = _dot(g, tl.trans(vj), PRECISION, DOT).to(ACC)
        dropped = p
        if HAS_DROP:
            keep_drop = _window_tile(DROP, bh, i, w, num_chunks, r, r, C, WIDTH, square_ok, 0)
            dropped = tl.where(keep_drop != 0, p * drop_scale, 0.0)
            dp = tl.where(keep_drop != 0, dp * drop_scale, 0.0)
        dv += _dot(tl.trans(dropped).to(g.dtype), g, PRECISION, DOT).to(ACC)
        ds = tl.where(replaced, 0.0, p * (dp - shift[:, None]))
        dk += _dot(tl.trans(ds).to(q.dtype), q, PRECISION, DOT).to(ACC)
    offsets = bh * rows * D + (j * C + r)[:, None] * D + dd[None, :]
    tl.store(DK + offsets, dk.to(DK.dtype.element_ty), mask=tile_ok)
    tl.store(DV + offsets, dv.to(DV.dtype.element_ty), mask=tile_ok)


# ----------------------------------------------------------------------------- host side

def _dot_precision(qk) -> str:
    """``tl.dot``'s input precision. float32: ``"tf32"`` where torch allows TF32 for float32
    matmuls (``torch.backends.cuda.matmul.allow_tf32``), else ``"tf32x3"`` (three TF32 products:
    float32 accuracy on tensor cores; ``"ieee"`` falls back to FMA loops, which take minutes to
    compile and run several times slower). Other dtypes: ``"ieee"`` (the setting only concerns
    float32)."""
    if qk.dtype == torch.float32 and qk.device.type == "cuda" and torch.version.hip is None:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    return "ieee"  # also on ROCm, whose Triton backend has no tf32x3


def _dot_dtype(dtype):
    """The ``tl.dot`` operand dtype for inputs of ``dtype``: the same, except bfloat16 in the
    interpreter (Triton 3.9's interpreter multiplies bfloat16 bit patterns as integers)."""
    if dtype == torch.bfloat16 and interpreted():
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}[dtype]


class _Layout:
    """Sizes of one call and the kernels' compile-time options."""

    def __init__(self, qk, perm, chunk_length, before, after, causal, has_keep, has_bias, has_drop, rate):
        batch, heads, length, head_dim = qk.shape
        self.shape = (batch, heads, length, head_dim)
        self.bh, self.length, self.d = batch * heads, length, head_dim
        self.rows = perm.shape[-1]
        self.rounds = self.rows // length
        self.chunks = self.rows // chunk_length
        width = before + 1 + after
        self.wrap = self.chunks * -(-width // self.chunks)  # a multiple of chunks >= width: indices stay >= 0
        self.acc = torch.float64 if qk.dtype == torch.float64 else torch.float32
        mask_value, self_value = mask_values(torch, self.acc)  # the kernels' logits are float32 or wider
        block = max(16, triton.next_power_of_2(chunk_length))
        block_d = max(16, triton.next_power_of_2(head_dim))
        self.scalars = (self.chunks, self.wrap, mask_value, self_value, 1.0 / (1.0 - rate) if has_drop else 1.0)
        self.options = dict(C=chunk_length, D=head_dim, BEFORE=before, WIDTH=width, BLOCK=block, BLOCK_D=block_d,
                            CAUSAL=causal, HAS_KEEP=has_keep, HAS_BIAS=has_bias, HAS_DROP=has_drop,
                            ACC=tl.float64 if self.acc == torch.float64 else tl.float32,
                            PRECISION=_dot_precision(qk), DOT=_dot_dtype(qk.dtype),
                            num_warps=4 if block * block_d >= 64 * 64 else 2)
        self.grid = (self.chunks, self.bh)

    def flat(self, index, count):
        """``(b*h, count)`` row indices into ``(b*h*count,)``."""
        offsets = torch.arange(self.bh, device=index.device)[:, None] * count
        return (index + offsets).reshape(-1)

    def gather(self, x, flat_positions):
        """Rows of ``x (b, h, L, d)`` at flat positions -> contiguous ``(b*h, rows, d)``."""
        return x.reshape(self.bh * self.length, -1).index_select(0, flat_positions).view(self.bh, self.rows, -1)

    def sum_rounds(self, sorted_rows, undo_flat):
        """Sorted rows ``(b*h, rows, d)`` -> ``(b, h, L, d)``, every round's copy added."""
        batch, heads, length, d = self.shape
        unsorted = sorted_rows.reshape(self.bh * self.rows, d).index_select(0, undo_flat)
        unsorted = unsorted.view(batch, heads, self.rounds, length, d)
        return unsorted[:, :, 0] if self.rounds == 1 else unsorted.sum(dim=2)


class _TritonChunkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qk, keys, v, perm, undo, key_keep, logit_bias, dropout_keep, rate, chunk_length, before, after,
                causal):
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
    has_drop = dropout_keep is not None and rate > 0.0
    lay = _Layout(qk, perm, chunk_length, before, after, causal, key_keep is not None, logit_bias is not None,
                  has_drop, rate)
    perm2 = perm.reshape(lay.bh, lay.rows)
    pos = perm2 % lay.length  # original position of every sorted row
    flat_pos = lay.flat(pos, lay.length)
    q_s, k_s, v_s = (lay.gather(x, flat_pos) for x in (qk, keys, v))
    pos32 = pos.to(torch.int32).contiguous()
    keep_s = q_s  # a placeholder pointer for the kernels' unused arguments
    if key_keep is not None:
        heads = lay.shape[1]
        keep_s = key_keep[:, None, :].expand(-1, heads, -1).reshape(-1).index_select(0, flat_pos)
        keep_s = keep_s.view(lay.bh, lay.rows).to(torch.uint8)
    bias = q_s if logit_bias is None else logit_bias.reshape(lay.bh, lay.chunks, chunk_length, -1).contiguous()
    drop = q_s if not has_drop else dropout_keep.reshape(lay.bh, lay.chunks, chunk_length, -1).to(torch.uint8)
    out_s = torch.empty_like(q_s)
    m = torch.empty(lay.bh, lay.rows, dtype=lay.acc, device=qk.device)
    total = torch.empty_like(m)
    _forward_kernel[lay.grid](q_s, k_s, v_s, pos32, keep_s, bias, drop, out_s, m, total, *lay.scalars, **lay.options)

    undo_flat = lay.flat(undo.reshape(lay.bh, lay.rows), lay.rows)
    batch, heads, length, d = lay.shape
    lse_s = m + torch.log(total)  # float32 (or float64): the round weights are computed at least that wide
    outs = out_s.view(-1, d).index_select(0, undo_flat).view(batch, heads, lay.rounds, length, d)
    lses = lse_s.view(-1).index_select(0, undo_flat).view(batch, heads, lay.rounds, length)
    ctx.lay = lay
    ctx.save_for_backward(q_s, k_s, v_s, pos32, keep_s, bias, drop, m, total, lay.flat(perm2, lay.rows), undo_flat,
                          outs, lses)
    from array_api_compat import torch as xp

    result = combine_rounds(xp, outs, lses)
    return result.clone() if result._base is outs else result  # one round: never a view of a saved tensor


def _backward(ctx, d_result):
    from array_api_compat import torch as xp

    lay = ctx.lay
    q_s, k_s, v_s, pos32, keep_s, bias, drop, m, total, perm_flat, undo_flat, outs, lses = ctx.saved_tensors
    d_outs, d_lses = combine_rounds_backward(xp, outs, lses, d_result.contiguous())
    # d logits = P * (dP - shift), shift = rowsum(dO * O) - d lse, per row in sorted order.
    # NaN outputs (rows that met a non-finite value) count as 0 here, so a zero cotangent on them
    # leaves the other rows' gradients finite.
    clean = torch.where(torch.isnan(outs), 0.0, outs).to(lay.acc)
    shift = (d_outs.to(lay.acc) * clean).sum(dim=-1)
    if d_lses is not None:
        shift = shift - d_lses.to(lay.acc)
    shift = shift.reshape(-1).index_select(0, perm_flat).view(lay.bh, lay.rows)
    d_out = d_outs.reshape(-1, lay.d).index_select(0, perm_flat).view(lay.bh, lay.rows, lay.d).to(q_s.dtype)
    d_q, d_k, d_v = torch.empty_like(q_s), torch.empty_like(k_s), torch.empty_like(v_s)
    common = (q_s, k_s, v_s, pos32, keep_s, bias, drop, m, total, d_out, shift)
    _dq_kernel[lay.grid](*common, d_q, *lay.scalars, **lay.options)
    _dkdv_kernel[lay.grid](*common, d_k, d_v, *lay.scalars, **lay.options)
    return (lay.sum_rounds(d_q, undo_flat), lay.sum_rounds(d_k, undo_flat), lay.sum_rounds(d_v, undo_flat),
            None, None, None, None, None, None, None, None, None, None)
