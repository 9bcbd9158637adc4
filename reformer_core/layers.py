"""Position-wise layers: dense, layer norm, activations, and the chunked feed-forward."""

from __future__ import annotations

import math
from typing import Any, Callable

__all__ = ["dense", "layer_norm", "activation", "feed_forward", "apply_in_chunks", "dropout"]


def dense(xp, x: Any, params: dict):
    """``x @ weight + bias``: x ``(..., d_in)``, weight ``(d_in, d_out)``, bias ``(d_out,)`` or absent."""
    out = xp.matmul(x, params["weight"])
    bias = params.get("bias")
    return out if bias is None else out + bias


def layer_norm(xp, x: Any, params: dict, eps: float):
    """Normalise the last axis to zero mean and unit (biased) variance, then scale and shift."""
    mean = xp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    variance = xp.mean(centred * centred, axis=-1, keepdims=True)
    return centred / xp.sqrt(variance + eps) * params["scale"] + params["bias"]


def activation(xp, name: str, x: Any):
    """``relu``, ``gelu_tanh`` (the tanh approximation; erf is not in the Array API) or ``silu``."""
    if name == "relu":
        return xp.maximum(x, xp.zeros_like(x))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    if name == "silu":
        return x / (1.0 + xp.exp(-x))
    raise ValueError(f"unknown activation {name!r}; use relu, gelu_tanh or silu")


def apply_in_chunks(xp, fn: Callable[[Any], Any], x: Any, chunk_length: int | None, axis: int = 1):
    """``fn(x)`` computed ``chunk_length`` positions at a time along ``axis`` and concatenated.

    ``fn`` must act on each position independently. Peak memory of ``fn``'s intermediates
    then depends on ``chunk_length``, not on the sequence length. The last chunk may be short.
    """
    length = x.shape[axis]
    if chunk_length is None or chunk_length >= length:
        return fn(x)
    axis = axis % x.ndim
    lead = (slice(None),) * axis
    pieces = [
        fn(x[(*lead, slice(start, min(start + chunk_length, length)), ...)]) for start in range(0, length, chunk_length)
    ]
    return xp.concat(pieces, axis=axis)


def feed_forward(xp, x: Any, params: dict, *, activation_name: str = "relu"):
    """``Dense(d_ff) -> activation -> Dense(d_model)`` with params ``dense_in``/``dense_out``."""
    hidden = activation(xp, activation_name, dense(xp, x, params["dense_in"]))
    return dense(xp, hidden, params["dense_out"])


def dropout(xp, x: Any, keep: Any, rate: float):
    """Inverted dropout with an explicit bool ``keep`` mask (None: identity)."""
    if keep is None or rate == 0.0:
        return x
    return xp.where(keep, x * (1.0 / (1.0 - rate)), xp.zeros_like(x))
