"""Combining the hashing rounds of LSH attention (the paper's appendix).

Round r gives an output ``o_r`` and the log-sum-exp ``z_r`` of its logits; the result is
``sum_r w_r o_r`` with ``w = softmax_r(z)``. The weights are normalised explicitly
(``e / sum(e)``, not ``exp(z - logsumexp(z))``) in float32 or wider: the unnormalised form
loses up to 0.2% in float32 and up to a factor of ``n`` in bfloat16 on tokens that can only
attend to themselves. The forward and its backward share :func:`round_weights`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["round_weights", "combine_rounds", "combine_rounds_backward"]


def round_weights(xp, lses: Any):
    """``softmax_r(z)`` over axis 2 of ``lses (b, h, n, L)``, in float32 or wider."""
    z = xp.astype(lses, xp.result_type(lses.dtype, xp.float32), copy=False)
    e = xp.exp(z - xp.max(z, axis=2, keepdims=True))
    return e / xp.sum(e, axis=2, keepdims=True)


def combine_rounds(xp, outs: Any, lses: Any):
    """``sum_r softmax_r(z)_r * o_r`` for ``outs (b, h, n, L, d)`` and ``lses (b, h, n, L)``."""
    if outs.shape[2] == 1:
        return outs[:, :, 0, ...]
    weights = round_weights(xp, lses)
    wide = xp.result_type(outs.dtype, weights.dtype)
    return xp.astype(xp.sum(xp.astype(outs, wide, copy=False) * weights[..., None], axis=2), outs.dtype, copy=False)


def combine_rounds_backward(xp, outs: Any, lses: Any, d_result: Any):
    """VJP of :func:`combine_rounds` -> ``(d_outs, d_lses)`` (``d_lses`` None for one round)."""
    if outs.shape[2] == 1:
        return d_result[:, :, None, ...], None
    weights = round_weights(xp, lses)
    wide = xp.result_type(outs.dtype, weights.dtype)
    g = xp.astype(d_result, wide, copy=False)[:, :, None, ...]
    d_weights = xp.sum(g * xp.astype(outs, wide, copy=False), axis=-1)
    d_z = weights * (d_weights - xp.sum(weights * d_weights, axis=2, keepdims=True))
    return xp.astype(weights[..., None] * g, outs.dtype, copy=False), xp.astype(d_z, lses.dtype, copy=False)
