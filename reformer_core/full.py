"""Exact O(L^2) shared-QK attention: the reference LSH attention approximates."""

from __future__ import annotations

from typing import Any

from ._arrays import namespace
from .attend import attend, broadcast_keep, check_attention_inputs, positions_like, shared_qk_keys

__all__ = ["full_attention"]


def full_attention(
    qk: Any,
    v: Any,
    *,
    causal: bool = False,
    attention_mask: Any = None,
    dropout_rate: float = 0.0,
    dropout_keep: Any = None,
    check_finite: bool = False,
):
    """Shared-QK attention over the whole sequence, with the masks of LSH attention.

    Queries are ``qk``; keys are ``qk`` normalised to unit RMS and divided by
    ``sqrt(head_dim)``. Masked logits (causal: key after query; padding) become -1e9, and a
    token's logit with itself becomes -1e5 last, so a token attends to itself only when no
    other key is allowed. This is what :func:`lsh_attention` computes when one chunk holds
    the whole sequence.

    Args:
        qk, v: ``(batch, heads, length, head_dim)``, one floating dtype, one device.
        causal: mask keys after the query.
        attention_mask: optional ``(batch, length)`` bool/int, True/1 for real tokens.
        dropout_rate, dropout_keep: attention dropout with an explicit bool keep mask
            ``(batch, heads, length, length)``.
        check_finite: raise ValueError if an input holds NaN or inf (costs a device sync).

    Returns:
        ``(batch, heads, length, head_dim)``.
    """
    xp = namespace(qk, v, attention_mask, dropout_keep)
    (batch, heads, length, _), keep = check_attention_inputs(
        xp, {"qk": qk, "v": v}, attention_mask, causal=causal, check_finite=check_finite
    )
    out, _ = shared_qk_attention(xp, qk, v, causal, keep, dropout_rate, dropout_keep)
    return out


def shared_qk_attention(xp, qk, v, causal, keep, dropout_rate=0.0, dropout_keep=None):
    """Unvalidated shared-QK attention over all positions -> ``(out, logsumexp)``."""
    heads, length = qk.shape[1], qk.shape[2]
    positions = positions_like(xp, qk, length)
    return attend(
        xp,
        qk,
        shared_qk_keys(xp, qk),
        v,
        query_positions=positions,
        key_positions=positions,
        causal=causal,
        key_keep=None if keep is None else broadcast_keep(xp, keep, heads),
        self_mask=True,
        dropout_keep=dropout_keep,
        dropout_rate=dropout_rate,
    )
