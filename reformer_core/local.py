"""Chunked local attention with separate queries, keys and values."""

from __future__ import annotations

import math
from typing import Any

from ._arrays import namespace
from .attend import attend, broadcast_keep, check_attention_inputs, check_chunking, positions_like
from .chunking import look_adjacent, merge_chunks, split_chunks

__all__ = ["local_attention"]


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
        q, k, v: ``(batch, heads, length, head_dim)``; ``length`` a multiple of
            ``chunk_length`` when longer than it.
        attention_mask: optional ``(batch, length)`` bool/int, True/1 for real tokens.
        dropout_rate, dropout_keep: attention dropout with an explicit bool keep mask of
            the logits' shape ``(batch, heads, num_chunks, chunk_length, window)``.
        check_finite: raise ValueError if an input holds NaN or inf (costs a device sync).

    Returns:
        ``(batch, heads, length, head_dim)``.
    """
    xp = namespace(q, k, v, attention_mask, dropout_keep)
    (batch, heads, length, head_dim), keep = check_attention_inputs(
        xp, {"q": q, "k": k, "v": v}, attention_mask, causal=causal, check_finite=check_finite
    )
    check_chunking(length, chunk_length, num_chunks_before, num_chunks_after, "local_attention")
    q = q * (1.0 / math.sqrt(head_dim))
    positions = positions_like(xp, q, length)
    key_keep = None if keep is None else broadcast_keep(xp, keep, heads)
    if length <= chunk_length:
        out, _ = attend(xp, q, k, v, query_positions=positions, key_positions=positions, causal=causal,
                        key_keep=key_keep, dropout_keep=dropout_keep, dropout_rate=dropout_rate)
        return out

    def window(x, axis=2):
        return look_adjacent(xp, split_chunks(xp, x, chunk_length, axis=axis), num_chunks_before, num_chunks_after, axis=axis)

    chunk_positions = split_chunks(xp, positions, chunk_length, axis=0)
    out, _ = attend(
        xp,
        split_chunks(xp, q, chunk_length),
        window(k),
        window(v),
        query_positions=chunk_positions,
        key_positions=window(positions, axis=0),
        causal=causal,
        key_keep=None if key_keep is None else window(key_keep),
        dropout_keep=dropout_keep,
        dropout_rate=dropout_rate,
    )
    return merge_chunks(xp, out)
