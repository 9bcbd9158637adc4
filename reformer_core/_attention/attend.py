"""The masked softmax attention every kind shares, and its mask constants.

Masks follow trax and HF transformers: a masked logit is *replaced* by a large negative
finite value (not -inf, so no row ever becomes NaN), and with shared-QK attention a token's
logit with itself is replaced, after every other mask, by a smaller negative value, so a
token attends to itself only when nothing else is allowed.
"""

from __future__ import annotations

import math
from typing import Any

from .._arrays import check_finite as _check_finite
from .._arrays import (
    check_flag,
    check_rank,
    check_same_device,
    check_same_float_dtype,
    device_of,
    keep_mask,
    dropout,
    rsqrt_mean_square,
)

__all__ = [
    "MASK_VALUE",
    "SELF_MASK_VALUE",
    "mask_values",
    "attend",
    "attend_backward",
    "shared_qk_keys",
    "shared_qk_keys_backward",
]

KEY_NORM_EPS = 1e-6
MASK_VALUE = -1e9
SELF_MASK_VALUE = -1e5
# float16 cannot hold -1e9 (its largest magnitude is 65504); these keep the same order.
_FLOAT16_MASK_VALUES = (-1e4, -1e3)


def mask_values(xp, dtype) -> tuple[float, float]:
    """``(mask_value, self_mask_value)`` for logits of ``dtype``."""
    if hasattr(xp, "float16") and dtype == xp.float16:
        return _FLOAT16_MASK_VALUES
    return MASK_VALUE, SELF_MASK_VALUE


def attend(
    xp,
    query: Any,
    key: Any,
    value: Any,
    *,
    query_positions: Any,
    key_positions: Any,
    causal: bool,
    key_keep: Any = None,
    self_mask: bool = False,
    logit_bias: Any = None,
    dropout_keep: Any = None,
    dropout_rate: float = 0.0,
    return_residuals: bool = False,
):
    """Softmax attention of ``query`` over ``key``/``value`` with position-based masks.

    Args:
        query: ``(..., q, d)``; key: ``(..., k, d)``; value: ``(..., k, dv)`` (already scaled).
        query_positions, key_positions: int ``(..., q)`` and ``(..., k)``, original positions.
        causal: mask keys whose position exceeds the query's.
        key_keep: optional bool ``(..., k)``, False for padding keys.
        self_mask: replace the logit of a query with its own position (shared-QK).
        logit_bias: optional ``(..., q, k)`` added to the logits before masking.
        dropout_keep: optional bool ``(..., q, k)``; kept probabilities are scaled by
            ``1 / (1 - dropout_rate)``.

    Returns:
        ``(out, logsumexp)``: ``(..., q, dv)`` and ``(..., q)``; with ``return_residuals``
        also what :func:`attend_backward` needs: ``(probs, replaced)``, the softmax before
        dropout and the bool mask of logits replaced by a constant (or None).
    """
    if dropout_keep is not None or dropout_rate:
        check_dropout(xp, dropout_rate, dropout_keep, (*query.shape[:-1], key.shape[-2]))
    mask_value, self_value = mask_values(xp, query.dtype)
    device = device_of(query)
    logits = xp.matmul(query, xp.matrix_transpose(key))
    if logit_bias is not None:
        logits = logits + logit_bias
    masked = None
    if causal:
        masked = key_positions[..., None, :] > query_positions[..., :, None]
    if key_keep is not None:
        padding = xp.logical_not(key_keep)[..., None, :]
        masked = padding if masked is None else xp.logical_or(masked, padding)
    if masked is not None:
        logits = xp.where(masked, xp.asarray(mask_value, dtype=logits.dtype, device=device), logits)
    replaced = masked
    if self_mask:
        is_self = key_positions[..., None, :] == query_positions[..., :, None]
        logits = xp.where(is_self, xp.asarray(self_value, dtype=logits.dtype, device=device), logits)
        replaced = is_self if replaced is None else xp.logical_or(replaced, is_self)
    # Normalise explicitly: exp(logits - logsumexp) loses up to ulp(1e5) ~ 0.4% of the mass in
    # float32 when the -1e5 self logit is the largest (a token that can only see itself).
    top = xp.max(logits, axis=-1, keepdims=True)
    weights = xp.exp(logits - top)
    total = xp.sum(weights, axis=-1, keepdims=True)
    probs = weights / total
    lse = xp.squeeze(top + xp.log(total), axis=-1)
    out = xp.matmul(dropout(xp, probs, dropout_keep, dropout_rate), value)
    if return_residuals:
        return out, lse, (probs, replaced)
    return out, lse


def attend_backward(xp, query, key, value, residuals, d_out, d_lse=None, *, dropout_keep=None, dropout_rate=0.0):
    """Vector-Jacobian product of :func:`attend` -> ``(d_query, d_key, d_value)``.

    ``residuals`` is ``(probs, replaced)`` from ``attend(..., return_residuals=True)``;
    ``d_out`` is ``(..., q, dv)`` and ``d_lse`` the optional ``(..., q)`` cotangent of the
    log-sum-exp. Logits replaced by a mask constant are constants: no gradient flows there.
    """
    probs, replaced = residuals
    dropped = dropout(xp, probs, dropout_keep, dropout_rate)
    d_value = xp.matmul(xp.matrix_transpose(dropped), d_out)
    d_probs = dropout(xp, xp.matmul(d_out, xp.matrix_transpose(value)), dropout_keep, dropout_rate)
    d_logits = probs * (d_probs - xp.sum(d_probs * probs, axis=-1, keepdims=True))
    if d_lse is not None:
        d_logits = d_logits + d_lse[..., None] * probs
    if replaced is not None:
        d_logits = xp.where(replaced, xp.zeros_like(d_logits), d_logits)
    return xp.matmul(d_logits, key), xp.matmul(xp.matrix_transpose(d_logits), query), d_value


def check_dropout(xp, dropout_rate: Any, dropout_keep: Any, logits_shape: tuple) -> None:
    """Raise when the attention dropout rate is not in [0, 1) or the keep mask does not fit."""
    if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, (int, float)):
        raise TypeError(f"dropout_rate must be a float in [0, 1), got {dropout_rate!r}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
    if dropout_keep is None:
        return
    if dropout_keep.dtype != xp.bool:
        raise TypeError(f"dropout_keep must be a bool mask (True = keep), got dtype {dropout_keep.dtype}")
    if tuple(dropout_keep.shape) != tuple(logits_shape):
        raise ValueError(
            f"dropout_keep has shape {tuple(dropout_keep.shape)}, but the attention probabilities have shape "
            f"{tuple(logits_shape)}; draw it with reformer_core.sample_dropout_masks or of that shape"
        )


def shared_qk_keys(xp, qk: Any):
    """Keys of shared-QK attention: ``qk * rsqrt(mean(qk^2, -1) + 1e-6) / sqrt(head_dim)``."""
    head_dim = qk.shape[-1]
    return qk * (rsqrt_mean_square(xp, qk, KEY_NORM_EPS) * (1.0 / math.sqrt(head_dim)))


def shared_qk_keys_backward(xp, qk: Any, d_keys: Any):
    """VJP of :func:`shared_qk_keys`: with ``a = rsqrt(mean(x^2) + eps)`` and ``s = 1/sqrt(D)``,
    ``dx = s * (a * dk - x * a^3 * mean(dk * x))``."""
    a = rsqrt_mean_square(xp, qk, KEY_NORM_EPS)
    scale = 1.0 / math.sqrt(qk.shape[-1])
    return scale * (a * d_keys - qk * (a * a * a) * xp.mean(d_keys * qk, axis=-1, keepdims=True))


def check_attention_inputs(xp, named: dict[str, Any], attention_mask: Any = None, *, causal: Any = False,
                           check_finite: Any = False):
    """Validate ``(batch, heads, length, head_dim)`` inputs; return the shape and keep mask."""
    check_flag("causal", causal)
    check_flag("check_finite", check_finite)
    shape = None
    for name, array in named.items():
        check_rank(name, array, 4, "(batch, heads, length, head_dim)")
        if shape is None:
            shape = tuple(array.shape)
            first = name
        elif tuple(array.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(array.shape)} but {first} has {shape}; they must match")
    check_same_float_dtype(xp, named)
    check_same_device({**named, "attention_mask": attention_mask})
    batch, heads, length, head_dim = shape
    keep = None if attention_mask is None else keep_mask(xp, attention_mask, batch, length)
    if check_finite:
        for name, array in named.items():
            _check_finite(xp, name, array)
    return shape, keep


def check_chunking(length: int, chunk_length: int, num_chunks_before: int, num_chunks_after: int, what: str) -> None:
    for name, value, low in (("chunk_length", chunk_length, 1), ("num_chunks_before", num_chunks_before, 0),
                             ("num_chunks_after", num_chunks_after, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if length > chunk_length and length % chunk_length:
        raise ValueError(
            f"{what}: sequence length {length} is not a multiple of chunk_length={chunk_length}; "
            f"pad it with reformer_core.pad_to_multiple (and pass the returned attention_mask) "
            f"or choose a chunk_length that divides it"
        )


def positions_like(xp, x: Any, length: int):
    """int64 positions ``0 .. length - 1`` on ``x``'s device."""
    return xp.arange(length, dtype=xp.int64, device=device_of(x))


def broadcast_keep(xp, keep: Any, heads: int):
    """Padding mask ``(batch, length)`` -> ``(batch, heads, length)``."""
    batch, length = keep.shape
    return xp.broadcast_to(keep[:, None, :], (batch, heads, length))
