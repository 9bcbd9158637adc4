"""The fast path of LSH attention on JAX: sorted-chunk attention as one ``jax.custom_vjp``.

The core (``reformer_core/_attention/lsh.py``) hashes and sorts; this module does the step
that follows with the core's exact semantics (``attend``: bias added, causal/padding masks
replaced by ``mask_values(...)[0]``, then every entry where a query meets its own position
replaced by the self value, an explicitly normalised softmax, the per-row log-sum-exp), then
``combine_rounds`` (differentiated by JAX's autodiff, outside the custom function, as is the
shared-QK key normalisation ``shared_qk_keys``). Laid out for memory:

* the sorted queries, keys and values are gathered batch-major ``(b*h, rows, d)``; keys,
  values, positions and the padding mask get a halo (``before`` chunks in front, ``after``
  behind, wrapping), so the window of chunk ``i`` is halo rows ``[i*c, (i+width)*c)``;
* chunks are processed in blocks whose logits stay under :data:`BLOCK_BYTES` (a
  ``lax.map`` over blocks; one block needs no loop); a block's windows are its halo slab's
  shifted views concatenated, masks are position comparisons, nothing mask-shaped is kept;
* the custom forward keeps only its inputs (``qk``, the keys, ``v``, ``perm``, ``undo``,
  the padding/dropout masks and bias the caller holds anyway) and the per-round outputs and
  log-sum-exps ``(b, h, n, L, ...)``; the backward regathers the sorted rows and recomputes
  each block's probabilities (flash-style), so autodiff never stores ``O(L x window)``;
* gradients go back to positions by gathers with ``undo`` / ``perm`` and by rolls over the
  window slots (no scatter-add), so they are deterministic.

Kernels (:func:`kernel_choice`): ``"jnp"`` (the blockwise ``jax.numpy`` code above, the
default off GPU) or ``"pallas"`` (a ``jax.experimental.pallas`` forward, one program per
(row of ``b*h``, chunk), an online softmax over the window's chunks; opt-in until it has been
checked on a GPU: ``bench/gpu_check.sh`` runs the kernel tests with it).
The Pallas path uses the same custom VJP: Pallas forward, ``jnp`` recompute backward.
``"pallas-interpret"`` runs the Pallas forward in interpret mode (any device; for tests).
``REFORMER_JAX_LSH_KERNEL`` (``auto``/``jnp``/``pallas``/``pallas-interpret``) or
:data:`KERNEL` override the choice; it is read when a function is traced.

Like the core's ``attend``: 16-bit inputs are computed in float32 (the result comes back in
the input dtype), and a value row holding NaN or inf is read as zeros, the queries that reach
it with a nonzero (dropped-out) probability getting NaN outputs. The logit bias (the core's
duplicate correction, a function of the integer sort only) is treated as a constant
(``stop_gradient``); the integer and boolean inputs get no gradient. The whole step is one
``jax.jit`` (inlined under an outer one), so eager calls compile once per shape.

Status of the Pallas kernel: its forward is tested on the CPU in interpret mode only; it has
not yet run on a GPU here (Triton lowering wants power-of-two ``chunk_length`` and
``head_dim``, at least 16). It reads a float copy of the dropout mask (a forward temporary of
the mask's size). The backward is always the ``jnp`` recompute.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from reformer_core._attention.attend import mask_values, shared_qk_keys
from reformer_core._attention.rounds import combine_rounds

__all__ = ["lsh_chunk_attention", "kernel_choice", "BLOCK_BYTES", "KERNEL"]

BLOCK_BYTES = 16 << 20  # logits of one block of chunks, all (batch, head) rows together
KERNEL: str | None = None  # None: REFORMER_JAX_LSH_KERNEL, else "auto"
_KERNELS = ("auto", "jnp", "pallas", "pallas-interpret")


def lsh_chunk_attention(qk, v, perm, undo, *, key_keep, logit_bias, dropout_keep, dropout_rate, chunk_length,
                        num_chunks_before, num_chunks_after, causal, kernel=None):
    """Sorted-chunk attention and round combination for sorted ``perm``/``undo`` ``(b, h, n*L)``.

    ``qk``, ``v``: ``(b, h, L, d)``; ``key_keep``: bool ``(b, L)`` or None; ``logit_bias`` and
    ``dropout_keep``: ``(b, h, n*L // chunk_length, chunk_length, window)`` or None. ``kernel``:
    see :func:`kernel_choice`. Returns ``(b, h, L, d)``, differentiable in ``qk`` and ``v``.
    """
    static = _Static(float(dropout_rate), int(chunk_length), int(num_chunks_before), int(num_chunks_after),
                     bool(causal), kernel_choice(qk, kernel, chunk_length=chunk_length), int(BLOCK_BYTES))
    return _attention(qk, v, perm, undo, key_keep, logit_bias, dropout_keep, static)


@functools.partial(jax.jit, static_argnums=(7,))
def _attention(qk, v, perm, undo, key_keep, logit_bias, dropout_keep, static):
    """The whole step as one jitted function: eagerly one compilation per shape (not one per
    operation); inside an outer ``jax.jit`` it is inlined."""
    keys = shared_qk_keys(jnp, qk)  # autodiff differentiates the key normalisation itself
    wide = jnp.result_type(qk.dtype, jnp.float32)  # the core's logits dtype: float32 for 16-bit inputs
    qk_wide, keys, v_wide = (x.astype(wide) for x in (qk, keys, v))
    keep_drop = dropout_keep if dropout_keep is not None and static.rate != 0.0 else None  # as the core's dropout
    bias = None if logit_bias is None else jax.lax.stop_gradient(logit_bias)
    outs, lses = _rounds(qk_wide, keys, v_wide, perm, undo, key_keep, bias, keep_drop, static)
    return combine_rounds(jnp, outs, lses).astype(v.dtype)


def kernel_choice(array, kernel=None, *, chunk_length=None) -> str:
    """``"jnp"``, ``"pallas"`` or ``"pallas-interpret"`` for queries ``array (..., head_dim)``:
    ``kernel`` if given, else :data:`KERNEL`, else ``REFORMER_JAX_LSH_KERNEL``, else
    ``"auto"``: ``jnp`` everywhere for now. The Pallas forward passes its tests in interpret
    mode but has not yet run on a GPU, so it is chosen only by name (``"pallas"``: where its
    block shapes fit, :func:`pallas_fits`, and ``jnp`` elsewhere); once
    ``bench/gpu_check.sh`` has checked it, ``auto`` is meant to pick it on GPU when ``head_dim``
    and ``chunk_length`` are powers of two >= 16 (:func:`pallas_fits`)."""
    choice = kernel or KERNEL or os.environ.get("REFORMER_JAX_LSH_KERNEL", "") or "auto"
    if choice not in _KERNELS:
        raise ValueError(f"unknown LSH kernel {choice!r}; use one of {_KERNELS}")
    if choice == "pallas" and not pallas_fits(array.shape[-1], array.shape[-1] if chunk_length is None
                                               else chunk_length):
        return "jnp"  # "pallas" means: the Pallas forward where its block shapes fit
    return "jnp" if choice == "auto" else choice


def pallas_fits(head_dim: int, chunk_length: int) -> bool:
    """Whether the Pallas forward's block shapes fit: both sizes powers of two >= 16."""
    return all(size >= 16 and size & (size - 1) == 0 for size in (head_dim, chunk_length))


class _Static(NamedTuple):
    rate: float
    c: int
    before: int
    after: int
    causal: bool
    kernel: str
    block_bytes: int  # BLOCK_BYTES when traced (part of the jit cache key)


class _Geometry:
    """Sizes, halo indices and blocks of one call (plain Python and NumPy: static under jit)."""

    def __init__(self, qk, perm, static, itemsize):
        self.b, self.h, self.length, self.d = qk.shape
        self.bh = self.b * self.h
        self.rows = perm.shape[-1]
        self.rounds = self.rows // self.length
        self.c, self.before, self.after = static.c, static.before, static.after
        self.chunks = self.rows // self.c
        self.width = self.before + 1 + self.after
        self.window = self.width * self.c
        chunk = np.arange(-self.before, self.chunks + self.after) % self.chunks
        self.halo_index = (chunk[:, None] * self.c + np.arange(self.c)).reshape(-1)
        per_chunk = self.bh * self.c * self.window * itemsize
        per_block = min(self.chunks, max(1, static.block_bytes // per_chunk))
        self.blocks = -(-self.chunks // per_block)
        self.m = -(-self.chunks // self.blocks)  # chunks per block; the last block may overlap the one before
        self.starts = np.minimum(np.arange(self.blocks) * self.m, self.chunks - self.m)
        # Chunk i's result lies in block min(i // m, blocks - 1), at i - that block's start.
        block_of = np.minimum(np.arange(self.chunks) // self.m, self.blocks - 1)
        pick = block_of * self.m + np.arange(self.chunks) - self.starts[block_of]
        self.pick = None if np.array_equal(pick, np.arange(self.chunks)) else pick


class _Sorted(NamedTuple):
    """The sorted rows every block reads: queries ``(bh, rows, d)``, halo'd keys and values
    ``(bh, halo_rows, d)``, positions ``(bh, rows)`` / ``(bh, halo_rows)``, the halo's padding
    keep mask (or None), bias and dropout keep mask ``(bh, chunks, c, window)`` (or None)."""
    q: jax.Array
    k: jax.Array
    v: jax.Array
    pos: jax.Array
    pos_halo: jax.Array
    keep_halo: jax.Array | None
    bias: jax.Array | None
    keep_drop: jax.Array | None
    bad: jax.Array  # (bh, halo_rows) bool: value rows holding NaN or inf (zeroed in ``v``)
    k_finite: jax.Array  # ``k`` with non-finite rows zeroed (for d_q: a masked NaN key must not reach it)


def _gather_rows(x, index):
    """Rows ``x (bh, L, ...)`` at ``index (bh, k)`` -> ``(bh, k, ...)``."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1, mode="promise_in_bounds")


def _sort(qk, keys, v, perm, key_keep, bias, keep_drop, geo):
    def rows(x):
        return x.reshape(geo.bh, geo.length, *x.shape[3:])

    pos = perm.reshape(geo.bh, geo.rows) % geo.length
    pos_halo = jnp.take(pos, jnp.asarray(geo.halo_index), axis=1)
    keep_halo = None
    if key_keep is not None:
        keep = jnp.broadcast_to(key_keep[:, None, :], (geo.b, geo.h, geo.length))
        keep_halo = _gather_rows(rows(keep), pos_halo)

    def per_chunk(x):
        return None if x is None else x.reshape(geo.bh, geo.chunks, geo.c, geo.window)

    values, bad = _finite_rows(_gather_rows(rows(v), pos_halo))
    k = _gather_rows(rows(keys), pos_halo)
    return _Sorted(_gather_rows(rows(qk), pos), k, values, pos, pos_halo, keep_halo, per_chunk(bias),
                   per_chunk(keep_drop), bad, _finite_rows(k)[0])


def _finite_rows(x):
    """``(x with its non-finite rows zeroed, bool (..., rows) marking them)`` (the core's ``finite_rows``)."""
    bad = jnp.logical_not(jnp.isfinite(jnp.sum(x * 0, axis=-1)))  # NaN exactly where a row holds NaN or inf
    return jnp.where(bad[..., None], jnp.zeros_like(x), x), bad


def _rows_of_chunks(x, start, geo):
    """Rows of chunks ``start .. start + m - 1`` of ``x (bh, rows, ...)`` -> ``(bh, m, c, ...)``."""
    part = jax.lax.dynamic_slice_in_dim(x, start * geo.c, geo.m * geo.c, axis=1)
    return part.reshape(geo.bh, geo.m, geo.c, *x.shape[2:])


def _windows(x, start, geo):
    """Windows of chunks ``start ..`` from halo rows ``x (bh, halo_rows, ...)`` -> ``(bh, m, window, ...)``:
    the block's slab of halo rows, its ``width`` shifted views side by side."""
    slab = jax.lax.dynamic_slice_in_dim(x, start * geo.c, (geo.m + geo.width - 1) * geo.c, axis=1)
    tail = x.shape[2:]
    parts = [slab[:, k * geo.c:(k + geo.m) * geo.c].reshape(geo.bh, geo.m, geo.c, *tail) for k in range(geo.width)]
    return (parts[0] if geo.width == 1 else jnp.concatenate(parts, axis=2)).reshape(geo.bh, geo.m, geo.window, *tail)


def _block_probs(s: _Sorted, start, geo, static):
    """Probabilities ``(bh, m, c, window)`` of one block, their log-sum-exps ``(bh, m, c)``,
    the mask of replaced logits, the block's queries and key/value windows."""
    q = _rows_of_chunks(s.q, start, geo)
    k, v = _windows(s.k, start, geo), _windows(s.v, start, geo)
    logits = jnp.einsum("gmqd,gmkd->gmqk", q, k)
    if s.bias is not None:
        logits = logits + jax.lax.dynamic_slice_in_dim(s.bias, start, geo.m, axis=1)
    mask_value, self_value = mask_values(jnp, logits.dtype)
    query_pos = _rows_of_chunks(s.pos, start, geo)[..., :, None]
    key_pos = _windows(s.pos_halo, start, geo)[..., None, :]
    masked = None
    if static.causal:
        masked = key_pos > query_pos
    if s.keep_halo is not None:
        padding = jnp.logical_not(_windows(s.keep_halo, start, geo))[..., None, :]
        masked = padding if masked is None else masked | padding
    if masked is not None:
        logits = jnp.where(masked, jnp.asarray(mask_value, logits.dtype), logits)
    is_self = key_pos == query_pos
    logits = jnp.where(is_self, jnp.asarray(self_value, logits.dtype), logits)
    replaced = is_self if masked is None else masked | is_self
    top = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.exp(logits - top)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    lse = (top + jnp.log(total))[..., 0]
    return weights / total, lse, replaced, q, k, v


def _dropped(x, s: _Sorted, start, geo, static):
    """The core's inverted dropout of block-shaped ``x`` (linear: also its own VJP)."""
    if s.keep_drop is None:
        return x
    keep = jax.lax.dynamic_slice_in_dim(s.keep_drop, start, geo.m, axis=1)
    return jnp.where(keep, x * (1.0 / (1.0 - static.rate)), jnp.zeros_like(x))


def _over_blocks(body, geo):
    """``body(start)`` for every block, results ``(bh, m, ...)`` assembled to ``(bh, chunks, ...)``."""
    if geo.blocks == 1:
        return body(0)
    stacked = jax.lax.map(body, jnp.asarray(geo.starts, dtype=jnp.int32))

    def assemble(x):  # (blocks, bh, m, ...) -> (bh, chunks, ...)
        x = jnp.moveaxis(x, 0, 1).reshape(geo.bh, geo.blocks * geo.m, *x.shape[3:])
        return x if geo.pick is None else jnp.take(x, jnp.asarray(geo.pick), axis=1)

    return jax.tree.map(assemble, stacked)


def _forward_jnp(s: _Sorted, geo, static):
    def body(start):
        probs, lse, _, _, _, v = _block_probs(s, start, geo, static)
        dropped = _dropped(probs, s, start, geo, static)
        out = jnp.einsum("gmqk,gmkd->gmqd", dropped, v)
        # A query attending to a non-finite value row with nonzero probability gets NaN (the core's rule).
        reached = jnp.einsum("gmqk,gmk->gmq", dropped, _windows(s.bad, start, geo).astype(dropped.dtype)) > 0
        return jnp.where(reached[..., None], jnp.asarray(jnp.nan, out.dtype), out), lse

    out, lse = _over_blocks(body, geo)
    return out.reshape(geo.bh, geo.rows, geo.d), lse.reshape(geo.bh, geo.rows)


def _unsorted_rounds(x, undo, geo):
    """Sorted rows ``(bh, rows, ...)`` -> ``(b, h, n, L, ...)`` in (round, position) order."""
    x = _gather_rows(x, undo.reshape(geo.bh, geo.rows))
    return x.reshape(geo.b, geo.h, geo.rounds, geo.length, *x.shape[2:])


def _forward(qk, keys, v, perm, undo, key_keep, bias, keep_drop, static):
    geo = _Geometry(qk, perm, static, jnp.dtype(qk.dtype).itemsize)
    s = _sort(qk, keys, v, perm, key_keep, bias, keep_drop, geo)
    if static.kernel == "jnp":
        out, lse = _forward_jnp(s, geo, static)
    else:
        out, lse = _forward_pallas(s, geo, static, interpret=static.kernel == "pallas-interpret")
    return _unsorted_rounds(out, undo, geo), _unsorted_rounds(lse, undo, geo)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _rounds(qk, keys, v, perm, undo, key_keep, bias, keep_drop, static):
    """Per-round outputs ``(b, h, n, L, d)`` and log-sum-exps ``(b, h, n, L)``."""
    return _forward(qk, keys, v, perm, undo, key_keep, bias, keep_drop, static)


def _rounds_fwd(qk, keys, v, perm, undo, key_keep, bias, keep_drop, static):
    outs, lses = _forward(qk, keys, v, perm, undo, key_keep, bias, keep_drop, static)
    return (outs, lses), (qk, keys, v, perm, undo, key_keep, bias, keep_drop, outs, lses)


def _rounds_bwd(static, residuals, cotangents):
    qk, keys, v, perm, undo, key_keep, bias, keep_drop, outs, lses = residuals
    d_outs, d_lses = cotangents
    geo = _Geometry(qk, perm, static, jnp.dtype(qk.dtype).itemsize)
    s = _sort(qk, keys, v, perm, key_keep, bias, keep_drop, geo)
    # d logits = P * (dP - rowsum(dO * O) + d lse), dP = dropout(dO V^T): the shift per row.
    shift = jnp.sum(d_outs * outs, axis=-1) - d_lses
    perm2 = perm.reshape(geo.bh, geo.rows)
    shift = _gather_rows(shift.reshape(geo.bh, geo.rows), perm2)
    d_out = _gather_rows(d_outs.reshape(geo.bh, geo.rows, geo.d), perm2)

    def body(start):
        probs, _, replaced, q, _, v = _block_probs(s, start, geo, static)
        g = _rows_of_chunks(d_out, start, geo)
        d_v = jnp.einsum("gmqk,gmqd->gmkd", _dropped(probs, s, start, geo, static), g)
        d_probs = _dropped(jnp.einsum("gmqd,gmkd->gmqk", g, v), s, start, geo, static)
        d_logits = probs * (d_probs - _rows_of_chunks(shift, start, geo)[..., None])
        d_logits = jnp.where(replaced, jnp.zeros_like(d_logits), d_logits)  # mask constants: no gradient
        k_finite = _windows(s.k_finite, start, geo)
        return (jnp.einsum("gmqk,gmkd->gmqd", d_logits, k_finite), jnp.einsum("gmqk,gmqd->gmkd", d_logits, q), d_v)

    d_q, d_k_windows, d_v_windows = _over_blocks(body, geo)
    d_qk = _sum_rounds(d_q.reshape(geo.bh, geo.rows, geo.d), undo, geo)
    d_keys = _sum_rounds(_fold_windows(d_k_windows, geo), undo, geo)
    d_v = _sum_rounds(_fold_windows(d_v_windows, geo), undo, geo)
    return d_qk, d_keys, d_v, None, None, None, None, None


_rounds.defvjp(_rounds_fwd, _rounds_bwd)


def _fold_windows(d_windows, geo):
    """Window gradients ``(bh, chunks, window, d)`` -> sorted rows ``(bh, rows, d)``: slot ``k``
    of chunk ``i`` holds chunk ``i + k - before`` (mod chunks), so roll it back and add."""
    parts = d_windows.reshape(geo.bh, geo.chunks, geo.width, geo.c, geo.d)
    total = None
    for k in range(geo.width):
        part = parts[:, :, k]
        part = part if k == geo.before else jnp.roll(part, k - geo.before, axis=1)
        total = part if total is None else total + part
    return total.reshape(geo.bh, geo.rows, geo.d)


def _sum_rounds(sorted_rows, undo, geo):
    """Sorted rows ``(bh, rows, d)`` -> ``(b, h, L, d)``, every round's copy added."""
    per_round = _unsorted_rounds(sorted_rows, undo, geo)
    return per_round[:, :, 0] if geo.rounds == 1 else jnp.sum(per_round, axis=2)



# ---- the Pallas forward (GPU; any device in interpret mode) ----

def _forward_pallas(s: _Sorted, geo, static, *, interpret):
    """The forward of :func:`_forward_jnp` as one ``pallas_call``: a program per (row of
    ``b*h``, chunk) loads its queries, walks the window's ``width`` chunks of halo'd keys and
    values with an online softmax (running max, rescaled sums: the same normalised result in
    one pass), and writes the chunk's outputs and log-sum-exps."""
    from jax.experimental import pallas as pl

    dtype = s.q.dtype
    c, d, halo_rows = geo.c, geo.d, s.k.shape[1]
    inputs = [s.q, s.pos.astype(jnp.int32), s.k, s.v, s.pos_halo.astype(jnp.int32), s.bad.astype(dtype)]
    specs = [pl.BlockSpec((None, c, d), lambda i, j: (i, j, 0)), pl.BlockSpec((None, c), lambda i, j: (i, j)),
             pl.BlockSpec((None, halo_rows, d), lambda i, j: (i, 0, 0)),
             pl.BlockSpec((None, halo_rows, d), lambda i, j: (i, 0, 0)),
             pl.BlockSpec((None, halo_rows), lambda i, j: (i, 0)), pl.BlockSpec((None, halo_rows), lambda i, j: (i, 0))]
    chunk_spec = pl.BlockSpec((None, None, c, geo.window), lambda i, j: (i, j, 0, 0))
    optional = []
    if s.keep_halo is not None:
        inputs.append(s.keep_halo.astype(jnp.int32))
        specs.append(pl.BlockSpec((None, halo_rows), lambda i, j: (i, 0)))
        optional.append("keep")
    if s.bias is not None:
        inputs.append(s.bias.astype(dtype))
        specs.append(chunk_spec)
        optional.append("bias")
    if s.keep_drop is not None:  # kept entries scaled by 1 / (1 - rate), dropped ones 0
        inputs.append(jnp.where(s.keep_drop, jnp.asarray(1.0 / (1.0 - static.rate), dtype), jnp.zeros((), dtype)))
        specs.append(chunk_spec)
        optional.append("drop")
    kernel = functools.partial(_pallas_kernel, geo=geo, causal=static.causal, optional=tuple(optional))
    out, lse = pl.pallas_call(
        kernel, grid=(geo.bh, geo.chunks), in_specs=specs,
        out_specs=[pl.BlockSpec((None, c, d), lambda i, j: (i, j, 0)), pl.BlockSpec((None, c), lambda i, j: (i, j))],
        out_shape=[jax.ShapeDtypeStruct((geo.bh, geo.rows, d), dtype), jax.ShapeDtypeStruct((geo.bh, geo.rows), dtype)],
        interpret=interpret, name="reformer_lsh_chunk_forward",
    )(*inputs)
    return out, lse


def _pallas_kernel(*refs, geo, causal, optional):
    """One chunk's attention over its window (see :func:`_forward_pallas`)."""
    from jax.experimental import pallas as pl

    q_ref, pos_ref, k_ref, v_ref, pos_halo_ref, bad_ref, *rest = refs
    named = dict(zip(optional, rest))
    out_ref, lse_ref = rest[len(optional):]
    c = geo.c
    chunk = pl.program_id(1)
    q = q_ref[...]
    query_pos = pos_ref[...]
    mask_value, self_value = mask_values(jnp, q.dtype)
    top = jnp.full((c,), -jnp.inf, q.dtype)
    total = jnp.zeros((c,), q.dtype)
    reached = jnp.zeros((c,), q.dtype)
    acc = jnp.zeros((c, geo.d), q.dtype)
    for slot in range(geo.width):  # window chunk ``slot`` is halo rows [(chunk + slot) * c, ... + c)
        rows = pl.ds((chunk + slot) * c, c)
        key_pos = pos_halo_ref[rows]
        logits = jax.lax.dot_general(q, k_ref[rows, :], (((1,), (1,)), ((), ())))
        if "bias" in named:
            logits = logits + named["bias"][:, slot * c:(slot + 1) * c]
        masked = None
        if causal:
            masked = key_pos[None, :] > query_pos[:, None]
        if "keep" in named:
            padding = jnp.broadcast_to(named["keep"][rows][None, :] == 0, (c, c))
            masked = padding if masked is None else masked | padding
        if masked is not None:
            logits = jnp.where(masked, mask_value, logits)
        logits = jnp.where(key_pos[None, :] == query_pos[:, None], self_value, logits)
        new_top = jnp.maximum(top, jnp.max(logits, axis=1))
        rescale = jnp.exp(top - new_top)
        weights = jnp.exp(logits - new_top[:, None])
        total = total * rescale + jnp.sum(weights, axis=1)
        if "drop" in named:
            weights = weights * named["drop"][:, slot * c:(slot + 1) * c]
        acc = acc * rescale[:, None] + jnp.dot(weights, v_ref[rows, :])
        reached = reached * rescale + jnp.sum(weights * bad_ref[rows][None, :], axis=1)
        top = new_top
    out = acc / total[:, None]
    out_ref[...] = jnp.where(reached[:, None] > 0, jnp.nan, out).astype(out_ref.dtype)
    lse_ref[...] = (top + jnp.log(total)).astype(lse_ref.dtype)
