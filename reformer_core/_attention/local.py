"""Chunked local attention with separate queries, keys and values."""

from __future__ import annotations

import math
from typing import Any

from .._arrays import namespace
from .attend import attend, attend_backward, broadcast_keep, check_attention_inputs, check_chunking, positions_like
from .chunking import look_adjacent, look_adjacent_backward, merge_chunks, split_chunks

__all__ = ["local_attention", "local_attention_vjp"]


def local_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    chunk_length: int,
    num_chunks_before: int = 1,
    num_chunks_after: int = 0,
    causal: bool = False,
    attention_mask: Any = None,
    dropout_rate: float = 0.0,
    dropout_keep: Any = None,
    check_finite: bool = False,
):
    """Attention inside fixed chunks of the sequence plus neighbouring chunks.

    The sequence is cut into chunks of ``chunk_length``; each chunk's queries attend to the
    keys of that chunk, ``num_chunks_before`` chunks back and ``num_chunks_after`` forward,
    wrapping around at the ends (the first chunk looks back at the last, as in trax and HF;
    with ``causal=True`` the wrapped keys are masked anyway). Logits are scaled by
    ``1 / sqrt(head_dim)``; masked logits become -1e9. There is no self mask. When
    ``length <= chunk_length`` every query sees every key.

    Args:
        q: queries ``(batch, heads, length, head_dim)``; ``length`` a multiple of
            ``chunk_length`` when longer than it.
        k: keys, shaped like ``q``.
        v: values, shaped like ``q``.
        attention_mask: optional ``(batch, length)`` bool/int, True/1 for real tokens.
        dropout_rate: attention dropout rate, with ``dropout_keep``.
        dropout_keep: the explicit bool keep mask of that dropout, of
            the logits' shape ``(batch, heads, num_chunks, chunk_length, window)`` (a rate
            without a mask raises ValueError).
        check_finite: raise ValueError if an input holds NaN or inf (costs a device sync).

    Returns:
        ``(batch, heads, length, head_dim)``.
    """
    options = dict(chunk_length=chunk_length, num_chunks_before=num_chunks_before, num_chunks_after=num_chunks_after,
                   causal=causal, dropout_rate=dropout_rate, dropout_keep=dropout_keep)
    xp, keep = _validate(q, k, v, attention_mask, options, check_finite)
    return _local(xp, q, k, v, keep, options, with_pullback=False)[0]


def local_attention_vjp(q: Any, k: Any, v: Any, **kwargs):
    """``(local_attention(q, k, v, **kwargs), pullback)``; ``pullback(d_out) -> (d_q, d_k, d_v)``."""
    check_finite = kwargs.pop("check_finite", False)
    attention_mask = kwargs.pop("attention_mask", None)
    options = dict(num_chunks_before=1, num_chunks_after=0, causal=False, dropout_rate=0.0, dropout_keep=None)
    unknown = set(kwargs) - set(options) - {"chunk_length"}
    if unknown or "chunk_length" not in kwargs:
        raise TypeError(f"local_attention_vjp needs chunk_length= and takes local_attention's keywords; "
                        f"unexpected: {sorted(unknown)}")
    options.update(kwargs)
    xp, keep = _validate(q, k, v, attention_mask, options, check_finite)
    return _local(xp, q, k, v, keep, options, with_pullback=True)


def _validate(q, k, v, attention_mask, options, check_finite):
    xp = namespace(q, k, v, attention_mask, options["dropout_keep"])
    (_, _, length, _), keep = check_attention_inputs(
        xp, {"q": q, "k": k, "v": v}, attention_mask, causal=options["causal"], check_finite=check_finite
    )
    check_chunking(length, options["chunk_length"], options["num_chunks_before"], options["num_chunks_after"],
                   "local_attention")
    return xp, keep


def _local(xp, q, k, v, keep, options, with_pullback):
    heads, length, head_dim = q.shape[1], q.shape[2], q.shape[3]
    chunk, before, after = options["chunk_length"], options["num_chunks_before"], options["num_chunks_after"]
    scale = 1.0 / math.sqrt(head_dim)
    positions = positions_like(xp, q, length)
    key_keep = None if keep is None else broadcast_keep(xp, keep, heads)
    chunked = length > chunk

    def window(x, axis=2):
        return look_adjacent(xp, split_chunks(xp, x, chunk, axis=axis), before, after, axis=axis) if chunked else x

    def unwindow(d):  # VJP of window for (b, h, L, d) inputs
        return merge_chunks(xp, look_adjacent_backward(xp, d, before, after)) if chunked else d

    queries = split_chunks(xp, q * scale, chunk) if chunked else q * scale
    keys, values = window(k), window(v)
    dropout = {"dropout_keep": options["dropout_keep"], "dropout_rate": options["dropout_rate"]}
    out, _, residuals = attend(
        xp, queries, keys, values,
        query_positions=split_chunks(xp, positions, chunk, axis=0) if chunked else positions,
        key_positions=window(positions, axis=0),
        causal=options["causal"],
        key_keep=None if key_keep is None else window(key_keep),
        return_residuals=True,
        **dropout,
    )
    out = merge_chunks(xp, out) if chunked else out
    if not with_pullback:
        return out, None

    def pullback(d_out):
        d_out = split_chunks(xp, d_out, chunk) if chunked else d_out
        d_q, d_k, d_v = attend_backward(xp, queries, keys, values, residuals, d_out, **dropout)
        d_q = (merge_chunks(xp, d_q) if chunked else d_q) * scale
        return d_q, unwindow(d_k), unwindow(d_v)

    return out, pullback
