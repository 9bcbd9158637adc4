"""LSH attention (Reformer section 2): hash, sort, attend in chunks, unsort, combine rounds."""

from __future__ import annotations

from typing import Any

from .._arrays import check_flag, gather_positions, namespace
from .attend import (
    attend,
    attend_backward,
    broadcast_keep,
    check_attention_inputs,
    check_chunking,
    shared_qk_keys,
    shared_qk_keys_backward,
)
from .chunking import look_adjacent, look_adjacent_backward, merge_chunks, split_chunks
from .._config import validate_num_buckets
from .dispatch import native_lsh_backend, uses_standard_path
from .full import shared_qk_attention
from .hashing import check_rotations, compute_buckets
from .lean import lean_lsh_attention
from .rounds import combine_rounds, combine_rounds_backward
from .sorting import sort_by_bucket, unsort

__all__ = ["lsh_attention", "lsh_attention_vjp", "lsh_with_buckets", "duplicate_counts"]


def lsh_attention(
    qk: Any,
    v: Any,
    rotations: Any,
    *,
    num_buckets: int | tuple[int, ...],
    chunk_length: int,
    num_chunks_before: int = 1,
    num_chunks_after: int = 0,
    causal: bool = False,
    attention_mask: Any = None,
    duplicate_correction: bool = False,
    dropout_rate: float = 0.0,
    dropout_keep: Any = None,
    check_finite: bool = False,
):
    """Shared-QK attention restricted to tokens that hash alike.

    For each of ``num_hashes`` rounds (the rotations' third axis): hash ``qk`` into buckets
    (:func:`hash_vectors`), sort positions by ``(bucket, position)``, cut the sorted sequence
    of length ``num_hashes * length`` into chunks of ``chunk_length`` (chunks may span two
    rounds), and let each chunk attend to itself, ``num_chunks_before`` chunks back and
    ``num_chunks_after`` forward, wrapping around. Keys are ``qk`` at unit RMS divided by
    ``sqrt(head_dim)``; masks are those of :func:`full_attention` (causal and padding by
    original position: -1e9; self: -1e5, applied last). Each round r yields an output
    ``o_r`` and its log-sum-exp ``z_r``; the result is ``sum_r w_r o_r`` with
    ``w = softmax_r(z)`` normalised explicitly in at least float32.

    With ``duplicate_correction`` a key seen ``N_ij`` times across query i's windows (all
    rounds, all window slots) has ``log N_ij`` subtracted from its logit, so it counts once
    (the paper's appendix). When ``length <= chunk_length`` the result is exactly
    :func:`full_attention`.

    Args:
        qk: shared queries/keys ``(batch, heads, length, head_dim)``; ``length`` a multiple of
            ``chunk_length`` when longer than it.
        v: values, shaped like ``qk``.
        rotations: ``(heads, head_dim, num_hashes, rotation_size // 2)`` from
            :func:`random_rotations`, same dtype and device as ``qk``.
        num_buckets: an even int or a tuple of even factors.
        attention_mask: optional ``(batch, length)`` bool/int, True/1 for real tokens;
            padding hashes to an extra bucket that sorts last in each round.
        dropout_rate: attention dropout rate, with ``dropout_keep``.
        dropout_keep: the explicit bool keep mask of that dropout,
            ``(batch, heads, num_hashes * length // chunk_length, chunk_length, window)`` (a rate without a mask raises ValueError).
        check_finite: raise ValueError if an input holds NaN or inf (costs a device sync).

    Returns:
        ``(batch, heads, length, head_dim)``, the dtype of ``qk``.
    """
    xp, keep, options = _validate(qk, v, rotations, attention_mask, dict(
        num_buckets=num_buckets, chunk_length=chunk_length, num_chunks_before=num_chunks_before,
        num_chunks_after=num_chunks_after, causal=causal, duplicate_correction=duplicate_correction,
        dropout_rate=dropout_rate, dropout_keep=dropout_keep), check_finite)
    out, _ = _lsh(xp, qk, v, rotations, keep, options, with_pullback=False)
    return out


def lsh_attention_vjp(qk: Any, v: Any, rotations: Any, **kwargs):
    """``(lsh_attention(qk, v, rotations, **kwargs), pullback)``.

    ``pullback(d_out) -> (d_qk, d_v)``. Hashing has no gradient: the buckets (and so the
    sort) are held fixed, and the rotations get none. Memory: O(length) per call; the
    pullback recomputes the attention probabilities block by block (``_attention/lean.py``).
    Under :func:`standard_path` the windows and probabilities of the forward are kept instead.
    """
    check_finite = kwargs.pop("check_finite", False)
    attention_mask = kwargs.pop("attention_mask", None)
    unknown = set(kwargs) - set(_DEFAULTS)
    if unknown:
        raise TypeError(f"lsh_attention_vjp got unexpected arguments {sorted(unknown)}")
    if "num_buckets" not in kwargs or "chunk_length" not in kwargs:
        raise TypeError("lsh_attention_vjp needs num_buckets= and chunk_length=")
    xp, keep, options = _validate(qk, v, rotations, attention_mask, {**_DEFAULTS, **kwargs}, check_finite)
    return _lsh(xp, qk, v, rotations, keep, options, with_pullback=True)


_DEFAULTS = dict(num_buckets=None, chunk_length=None, num_chunks_before=1, num_chunks_after=0, causal=False,
                 duplicate_correction=False, dropout_rate=0.0, dropout_keep=None)


def _validate(qk, v, rotations, attention_mask, options, check_finite):
    xp = namespace(qk, v, rotations, attention_mask, options["dropout_keep"])
    (_, _, length, _), keep = check_attention_inputs(
        xp, {"qk": qk, "v": v}, attention_mask, causal=options["causal"], check_finite=check_finite
    )
    validate_num_buckets(options["num_buckets"])
    check_rotations(xp, qk, rotations, options["num_buckets"])
    check_flag("duplicate_correction", options["duplicate_correction"])
    check_chunking(length, options["chunk_length"], options["num_chunks_before"], options["num_chunks_after"],
                   "lsh_attention")
    return xp, keep, options


def _lsh(xp, qk, v, rotations, keep, options, with_pullback):
    if qk.shape[2] <= options["chunk_length"]:
        (out, _), pullback = shared_qk_attention(xp, qk, v, options["causal"], keep, options["dropout_rate"],
                                                 options["dropout_keep"], with_pullback=with_pullback)
        return out, pullback
    buckets = compute_buckets(xp, qk, rotations, options["num_buckets"], keep)
    return lsh_with_buckets(xp, qk, v, buckets, keep, with_pullback=with_pullback,
                            **{k: val for k, val in options.items() if k != "num_buckets"})


def lsh_with_buckets(xp, qk, v, buckets, keep, *, chunk_length, num_chunks_before, num_chunks_after, causal,
                     duplicate_correction=False, dropout_rate=0.0, dropout_keep=None, with_pullback=False):
    """LSH attention for given buckets ``(b, h, n, L)`` (no validation).

    Returns ``(out, pullback)``; ``pullback(d_out) -> (d_qk, d_v)`` when ``with_pullback``.
    """
    batch, heads, num_hashes, length = buckets.shape
    head_dim = v.shape[-1]
    perm, undo = sort_by_bucket(xp, buckets)
    if with_pullback and not uses_standard_path():  # blocks recomputed in the pullback (lean.py)
        return lean_lsh_attention(xp, qk, v, perm, undo, keep, chunk_length=chunk_length,
                                  num_chunks_before=num_chunks_before, num_chunks_after=num_chunks_after, causal=causal,
                                  duplicate_correction=duplicate_correction, dropout_rate=dropout_rate,
                                  dropout_keep=dropout_keep)
    bias = None
    if duplicate_correction and num_hashes > 1:
        counts = duplicate_counts(xp, perm, undo, length, chunk_length, num_chunks_before, num_chunks_after)
        bias = -xp.log(xp.astype(counts, qk.dtype))
    native = None if with_pullback else native_lsh_backend(qk)
    if native is not None:  # the backend's fused kernel for the same step (compared with this path by tests)
        return native.lsh_chunk_attention(
            qk, v, perm, undo, key_keep=keep, logit_bias=bias, dropout_keep=dropout_keep, dropout_rate=dropout_rate,
            chunk_length=chunk_length, num_chunks_before=num_chunks_before, num_chunks_after=num_chunks_after,
            causal=causal,
        ), None
    positions = perm % length  # original position of every sorted slot

    def window(x):
        return look_adjacent(xp, split_chunks(xp, x, chunk_length), num_chunks_before, num_chunks_after)

    key_keep = None
    if keep is not None:
        key_keep = window(xp.take_along_axis(broadcast_keep(xp, keep, heads), positions, axis=-1))
    keys = shared_qk_keys(xp, qk)
    queries = split_chunks(xp, gather_positions(xp, qk, positions), chunk_length)
    key_windows = window(gather_positions(xp, keys, positions))
    value_windows = window(gather_positions(xp, v, positions))
    dropout = {"dropout_keep": dropout_keep, "dropout_rate": dropout_rate}
    out, lse, residuals = attend(
        xp, queries, key_windows, value_windows,
        query_positions=split_chunks(xp, positions, chunk_length),
        key_positions=window(positions),
        causal=causal,
        key_keep=key_keep,
        self_mask=True,
        logit_bias=bias,
        return_residuals=True,
        **dropout,
    )
    outs = xp.reshape(unsort(xp, merge_chunks(xp, out), undo), (batch, heads, num_hashes, length, head_dim))
    lses = xp.reshape(unsort(xp, merge_chunks(xp, lse), undo), (batch, heads, num_hashes, length))
    result = combine_rounds(xp, outs, lses)
    if not with_pullback:
        return result, None

    def to_sorted_chunks(x):  # (b, h, n, L, ...) in (round, position) order -> sorted chunks
        flat = xp.reshape(x, (batch, heads, num_hashes * length, *x.shape[4:]))
        return split_chunks(xp, unsort(xp, flat, perm), chunk_length)

    def sum_over_rounds(sorted_chunks):  # sorted chunks -> (b, h, L, d), each round's copy added
        flat = unsort(xp, merge_chunks(xp, sorted_chunks), undo)
        return xp.sum(xp.reshape(flat, (batch, heads, num_hashes, length, flat.shape[-1])), axis=2)

    def pullback(d_out):
        d_outs, d_lses = combine_rounds_backward(xp, outs, lses, d_out)
        d_queries, d_key_windows, d_value_windows = attend_backward(
            xp, queries, key_windows, value_windows, residuals, to_sorted_chunks(d_outs),
            None if d_lses is None else to_sorted_chunks(d_lses), **dropout,
        )
        d_keys = sum_over_rounds(look_adjacent_backward(xp, d_key_windows, num_chunks_before, num_chunks_after))
        d_qk = sum_over_rounds(d_queries) + shared_qk_keys_backward(xp, qk, d_keys)
        d_v = sum_over_rounds(look_adjacent_backward(xp, d_value_windows, num_chunks_before, num_chunks_after))
        return d_qk, d_v

    return result, pullback


def duplicate_counts(xp, perm, undo, length, chunk_length, num_chunks_before, num_chunks_after):
    """``N_ij``: how often the key at each window slot appears across its query's windows.

    For a query at sorted slot s (position i, round r) and the key at one of its window
    slots (position j), count the pairs (round r', offset o) and rounds r'' such that j's
    round-r'' copy sits in chunk ``chunk_i(r') + o`` (modulo the number of chunks), i.e.
    the multiplicity of j in the union of i's windows over all rounds.

    Returns int64 ``(b, h, num_chunks, chunk_length, window)``, every entry >= 1.
    """
    batch, heads, total = perm.shape
    num_hashes = total // length
    num_chunks = total // chunk_length
    # undo[r * L + j] is the sorted slot of position j's round-r copy: its chunk, per position.
    chunk_of = xp.reshape(undo // chunk_length, (batch, heads, num_hashes, length))
    chunk_of = xp.permute_dims(chunk_of, (0, 1, 3, 2))  # (b, h, L, n)
    positions = perm % length
    query_chunks = split_chunks(xp, gather_positions(xp, chunk_of, positions), chunk_length)  # (b,h,C,c,n)
    key_chunks = look_adjacent(xp, split_chunks(xp, gather_positions(xp, chunk_of, positions), chunk_length),
                               num_chunks_before, num_chunks_after)  # (b,h,C,W,n)
    counts = None
    for r in range(num_hashes):
        for offset in range(-num_chunks_before, num_chunks_after + 1):
            target = (query_chunks[..., r] + offset) % num_chunks  # (b,h,C,c)
            for r2 in range(num_hashes):
                hit = xp.astype(key_chunks[..., None, :, r2] == target[..., None], xp.int64)
                counts = hit if counts is None else counts + hit
    return counts
