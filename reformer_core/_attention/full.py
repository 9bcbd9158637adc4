"""Exact O(L^2) shared-QK attention: the reference LSH attention approximates."""

from __future__ import annotations

from typing import Any

from .._arrays import namespace
from .attend import (
    attend,
    attend_backward,
    broadcast_keep,
    check_attention_inputs,
    positions_like,
    shared_qk_keys,
    shared_qk_keys_backward,
)

__all__ = ["full_attention", "full_attention_vjp"]


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
        qk: shared queries/keys ``(batch, heads, length, head_dim)``, one floating dtype, one device.
        v: values, shaped and typed like ``qk``.
        causal: mask keys after the query.
        attention_mask: optional ``(batch, length)`` bool/int, True/1 for real tokens.
        dropout_rate: attention dropout rate, with ``dropout_keep``.
        dropout_keep: the explicit bool keep mask of that dropout,
            ``(batch, heads, length, length)`` (a rate without a mask raises ValueError).
        check_finite: raise ValueError if an input holds NaN or inf (costs a device sync).

    Returns:
        ``(batch, heads, length, head_dim)``.
    """
    xp, keep = _validate(qk, v, causal, attention_mask, dropout_keep, check_finite)
    (out, _), _ = shared_qk_attention(xp, qk, v, causal, keep, dropout_rate, dropout_keep)
    return out


def full_attention_vjp(qk: Any, v: Any, **kwargs):
    """``(full_attention(qk, v, **kwargs), pullback)``; ``pullback(d_out) -> (d_qk, d_v)``."""
    options = {"causal": False, "attention_mask": None, "dropout_rate": 0.0, "dropout_keep": None,
               "check_finite": False}
    unknown = set(kwargs) - set(options)
    if unknown:
        raise TypeError(f"full_attention_vjp got unexpected keyword arguments {sorted(unknown)}; "
                        f"it takes full_attention's: {sorted(options)}")
    options.update(kwargs)
    xp, keep = _validate(qk, v, options["causal"], options["attention_mask"], options["dropout_keep"],
                         options["check_finite"])
    (out, _), pullback = shared_qk_attention(xp, qk, v, options["causal"], keep, options["dropout_rate"],
                                             options["dropout_keep"], with_pullback=True)
    return out, lambda d_out: pullback(d_out)


def _validate(qk, v, causal, attention_mask, dropout_keep, check_finite):
    xp = namespace(qk, v, attention_mask, dropout_keep)
    _, keep = check_attention_inputs(xp, {"qk": qk, "v": v}, attention_mask, causal=causal,
                                     check_finite=check_finite)
    return xp, keep


def shared_qk_attention(xp, qk, v, causal, keep, dropout_rate=0.0, dropout_keep=None, with_pullback=False):
    """Unvalidated shared-QK attention over all positions.

    Returns ``((out, logsumexp), pullback)``; ``pullback(d_out, d_lse=None) -> (d_qk, d_v)``
    when ``with_pullback`` (else None).
    """
    heads, length = qk.shape[1], qk.shape[2]
    positions = positions_like(xp, qk, length)
    keys = shared_qk_keys(xp, qk)
    out, lse, residuals = attend(
        xp, qk, keys, v,
        query_positions=positions,
        key_positions=positions,
        causal=causal,
        key_keep=None if keep is None else broadcast_keep(xp, keep, heads),
        self_mask=True,
        dropout_keep=dropout_keep,
        dropout_rate=dropout_rate,
        return_residuals=True,
    )
    if not with_pullback:
        return (out, lse), None

    def pullback(d_out, d_lse=None):
        d_q, d_k, d_v = attend_backward(xp, qk, keys, v, residuals, d_out, d_lse,
                                        dropout_keep=dropout_keep, dropout_rate=dropout_rate)
        return d_q + shared_qk_keys_backward(xp, qk, d_k), d_v

    return (out, lse), pullback
