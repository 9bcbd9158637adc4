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


def logits_dtype(xp, dtype):
    """The dtype attention logits, softmax and log-sum-exp are computed in: float32 for 16-bit
    inputs (float16 cannot hold the mask constants, and a float16 self constant would outrank
    real logits below it), else ``dtype``."""
    return xp.result_type(dtype, xp.float32)


def mask_values(xp, dtype) -> tuple[float, float]:
    """``(mask_value, self_mask_value)`` for logits of ``dtype`` (float32 or wider: see
    :func:`logits_dtype`); a masked logit is ``mask_value``, a token's logit with itself
    ``self_mask_value``, so their order holds against every real logit above -1e5."""
    if hasattr(xp, "float16") and dtype == xp.float16:
        raise TypeError("attention logits are computed in float32 or wider (reformer_core logits_dtype)")
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

    Logits, the softmax and the log-sum-exp are computed in :func:`logits_dtype` (float32 for
    16-bit inputs, also when autocast makes the matmul 16-bit); the output has ``value``'s
    dtype. A value row holding NaN or inf reaches only the queries that attend to it with a
    nonzero (dropped-out) probability, whose outputs are NaN: masked positions never leak,
    since ``0 * nan`` is never formed.

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
        ``(out, logsumexp)``: ``(..., q, dv)`` and ``(..., q)`` (logits dtype); with
        ``return_residuals`` also what :func:`attend_backward` needs: ``(probs, replaced)``,
        the softmax before dropout and the bool mask of logits replaced by a constant (or None).
    """
    if dropout_keep is not None or dropout_rate:
        check_dropout(xp, dropout_rate, dropout_keep, (*query.shape[:-1], key.shape[-2]))
    wide = logits_dtype(xp, query.dtype)
    device = device_of(query)
    logits = xp.matmul(xp.astype(query, wide, copy=False), xp.matrix_transpose(xp.astype(key, wide, copy=False)))
    logits = xp.astype(logits, logits_dtype(xp, logits.dtype), copy=False)  # autocast may have made it 16-bit
    mask_value, self_value = mask_values(xp, logits.dtype)
    if logit_bias is not None:
        logits = logits + xp.astype(logit_bias, logits.dtype, copy=False)
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
    dropped = dropout(xp, probs, dropout_keep, dropout_rate)
    finite_value, bad = finite_rows(xp, value)
    out = xp.matmul(dropped, xp.astype(finite_value, probs.dtype, copy=False))
    # Always, under jit too (a data-dependent branch would not trace): which rows meet a bad value.
    reached = xp.any(xp.logical_and(dropped > 0, bad[..., None, :]), axis=-1, keepdims=True)  # (..., q, 1)
    out = xp.where(reached, xp.asarray(math.nan, dtype=out.dtype, device=device), out)
    out = xp.astype(out, value.dtype, copy=False)
    if return_residuals:
        return out, lse, (probs, replaced)
    return out, lse


def finite_rows(xp, value: Any):
    """``(value with its non-finite rows zeroed, bool (..., k) marking them)``.

    A row is non-finite exactly when ``sum(row * 0)`` is NaN (``inf * 0`` and ``nan * 0``
    are NaN, a finite entry gives a zero): one multiply and a float row sum, 7-20x faster on
    torch than ``all(isfinite(value), axis=-1)``'s boolean reduction.
    """
    bad = xp.logical_not(xp.isfinite(xp.sum(value * 0, axis=-1)))
    return xp.where(bad[..., None], xp.zeros_like(value), value), bad


def attend_backward(xp, query, key, value, residuals, d_out, d_lse=None, *, dropout_keep=None, dropout_rate=0.0):
    """Vector-Jacobian product of :func:`attend` -> ``(d_query, d_key, d_value)``.

    ``residuals`` is ``(probs, replaced)`` from ``attend(..., return_residuals=True)``;
    ``d_out`` is ``(..., q, dv)`` and ``d_lse`` the optional ``(..., q)`` cotangent of the
    log-sum-exp. Logits replaced by a mask constant are constants: no gradient flows there,
    and non-finite key and value rows are read as zeros (where they matter, the forward
    probabilities, and so ``d_logits``, are NaN already). The arithmetic runs in the
    probabilities' dtype; gradients come back in the inputs'.
    """
    probs, replaced = residuals
    wide = probs.dtype

    def up(x):
        return xp.astype(x, wide, copy=False)

    finite_value, _ = finite_rows(xp, value)
    d_out = up(d_out)
    dropped = dropout(xp, probs, dropout_keep, dropout_rate)
    d_value = xp.matmul(xp.matrix_transpose(dropped), d_out)
    d_probs = dropout(xp, xp.matmul(d_out, xp.matrix_transpose(up(finite_value))), dropout_keep, dropout_rate)
    d_logits = probs * (d_probs - xp.sum(d_probs * probs, axis=-1, keepdims=True))
    if d_lse is not None:
        d_logits = d_logits + up(d_lse)[..., None] * probs
    if replaced is not None:
        d_logits = xp.where(replaced, xp.zeros_like(d_logits), d_logits)
    d_query = xp.matmul(d_logits, up(finite_rows(xp, key)[0]))  # a masked NaN key must not reach d_query
    d_key = xp.matmul(xp.matrix_transpose(d_logits), up(query))
    return (xp.astype(d_query, query.dtype, copy=False), xp.astype(d_key, key.dtype, copy=False),
            xp.astype(d_value, value.dtype, copy=False))


def check_dropout(xp, dropout_rate: Any, dropout_keep: Any, logits_shape: tuple) -> None:
    """Raise when the attention dropout rate is not in [0, 1) or the keep mask does not fit."""
    if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, (int, float)):
        raise TypeError(f"dropout_rate must be a float in [0, 1), got {dropout_rate!r}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
    if dropout_keep is None:
        if dropout_rate:
            raise ValueError(
                f"dropout_rate={dropout_rate!r} without dropout_keep would apply no dropout; pass the keep "
                f"mask (reformer_core.sample_dropout_masks draws it from a seed) or dropout_rate=0.0"
            )
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
    ``dx = s * (a * dk - x * a^3 * mean(dk * x))``, in float32 or wider (``a^3`` underflows
    float16), returned in ``qk``'s dtype."""
    wide = xp.result_type(qk.dtype, xp.float32)
    x, dk = xp.astype(qk, wide, copy=False), xp.astype(d_keys, wide, copy=False)
    a = rsqrt_mean_square(xp, x, KEY_NORM_EPS)
    scale = 1.0 / math.sqrt(qk.shape[-1])
    dx = scale * (a * dk - x * (a * a * a) * xp.mean(dk * x, axis=-1, keepdims=True))
    return xp.astype(dx, qk.dtype, copy=False)


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
