"""Position-wise layers: dense, layer norm, activations, dropout, the chunked feed-forward.

Each layer ``f`` has a forward and, where it has parameters or is used in training, a
``f_vjp`` returning ``(out, pullback)`` whose ``pullback(d_out)`` gives the gradients
(hand-written vector-Jacobian products, used by the NumPy and CuPy backends).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from .._arrays import dropout, zero_of
from .._attention.dispatch import native_layer_backend

__all__ = [
    "dense",
    "dense_vjp",
    "layer_norm",
    "layer_norm_vjp",
    "activation",
    "activation_backward",
    "dropout",
    "feed_forward",
    "feed_forward_vjp",
    "apply_in_chunks",
    "sum_leading",
]

_GELU_C = math.sqrt(2.0 / math.pi)


def sum_leading(xp, x: Any):
    """Sum over every axis but the last: ``(..., d) -> (d,)``."""
    return xp.sum(xp.reshape(x, (-1, x.shape[-1])), axis=0)


def dense(xp, x: Any, params: dict):
    """``x @ weight + bias``: x ``(..., d_in)``, weight ``(d_in, d_out)``, bias ``(d_out,)`` or absent."""
    weight, bias = params["weight"], params.get("bias")
    native = native_layer_backend(x)
    if native is not None and _one_dtype(x, weight, bias):
        return native.native_dense(x, weight, bias)
    out = xp.matmul(x, weight)
    return out if bias is None else out + bias


def _one_dtype(x, *others) -> bool:
    """Whether every array given (None skipped) has ``x``'s dtype: the native ops do not
    promote, so mixed inputs take the standard path (which promotes, or raises, as it always did)."""
    return all(other is None or other.dtype == x.dtype for other in others)


def dense_vjp(xp, x: Any, params: dict):
    """``(dense(x), pullback)``; ``pullback(d_out) -> (d_params, d_x)``."""

    def pullback(d_out):
        weight = params["weight"]
        flat_x = xp.reshape(x, (-1, weight.shape[0]))
        flat_d = xp.reshape(d_out, (-1, weight.shape[1]))
        grads = {"weight": xp.matmul(xp.matrix_transpose(flat_x), flat_d)}
        if params.get("bias") is not None:
            grads["bias"] = xp.sum(flat_d, axis=0)
        return grads, xp.matmul(d_out, xp.matrix_transpose(weight))

    return dense(xp, x, params), pullback


def _normalise(xp, x, eps):
    mean = xp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    inv_std = 1.0 / xp.sqrt(xp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    return centred * inv_std, inv_std


def layer_norm(xp, x: Any, params: dict, eps: float):
    """Normalise the last axis to zero mean and unit (biased) variance, then scale and shift."""
    native = native_layer_backend(x)
    # One feature: the fused backward's cancellation leaves ~1/sqrt(eps) ulps where the exact
    # gradient is 0 (the output is the bias alone); the standard rule gives the 0.
    if native is not None and x.shape[-1] > 1 and _one_dtype(x, params["scale"], params["bias"]):
        return native.native_layer_norm(x, params["scale"], params["bias"], eps)
    normalised, _ = _normalise(xp, x, eps)
    return normalised * params["scale"] + params["bias"]


def layer_norm_vjp(xp, x: Any, params: dict, eps: float):
    """``(layer_norm(x), pullback)``; ``pullback(d_out) -> (d_params, d_x)``.

    With ``xhat = (x - mean) / std`` and ``g = d_out * scale``:
    ``dx = (g - mean(g) - xhat * mean(g * xhat)) / std``.
    """
    normalised, inv_std = _normalise(xp, x, eps)

    def pullback(d_out):
        d_params = {"scale": sum_leading(xp, d_out * normalised), "bias": sum_leading(xp, d_out)}
        g = d_out * params["scale"]
        d_x = (g - xp.mean(g, axis=-1, keepdims=True)
               - normalised * xp.mean(g * normalised, axis=-1, keepdims=True)) * inv_std
        return d_params, d_x

    return normalised * params["scale"] + params["bias"], pullback


def activation(xp, name: str, x: Any):
    """``relu``, ``gelu_tanh`` (the tanh approximation; erf is not in the Array API) or ``silu``."""
    if name == "relu":
        native = native_layer_backend(x)
        if native is not None:
            return native.native_relu(x)
        # Not maximum(x, 0): autodiff frameworks split maximum's gradient 0.5/0.5 at x == 0
        # (which low precision hits), while the rule below passes none there. NaN still propagates.
        return xp.where(x <= 0, zero_of(xp, x), x)
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + xp.tanh(_GELU_C * (x + 0.044715 * x * x * x)))
    if name == "silu":
        return x / (1.0 + xp.exp(-x))
    raise ValueError(f"unknown activation {name!r}; use relu, gelu_tanh or silu")


def activation_backward(xp, name: str, x: Any, d_out: Any):
    """``d_out * activation'(x)``."""
    if name == "relu":
        return xp.where(x > 0, d_out, zero_of(xp, d_out))
    if name == "gelu_tanh":
        t = xp.tanh(_GELU_C * (x + 0.044715 * x * x * x))
        slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x * x)
        return d_out * slope
    if name == "silu":
        sigmoid = 1.0 / (1.0 + xp.exp(-x))
        return d_out * sigmoid * (1.0 + x * (1.0 - sigmoid))
    raise ValueError(f"unknown activation {name!r}; use relu, gelu_tanh or silu")


def apply_in_chunks(xp, fn: Callable[[Any], Any], x: Any, chunk_length: int | None, axis: int = 1):
    """``fn(x)`` computed ``chunk_length`` positions at a time along ``axis`` and concatenated.

    ``fn`` must act on each position independently. Peak memory of ``fn``'s intermediates
    then depends on ``chunk_length``, not on the sequence length. The last chunk may be short.
    """
    pieces = chunk_slices(x, chunk_length, axis)
    if len(pieces) == 1:
        return fn(x)
    return xp.concat([fn(piece) for piece in pieces], axis=axis)


def chunk_slices(x: Any, chunk_length: int | None, axis: int = 1) -> list:
    """Views of ``x`` of at most ``chunk_length`` positions along ``axis`` (one view when None)."""
    length = x.shape[axis]
    if chunk_length is None or chunk_length >= length:
        return [x]
    axis = axis % x.ndim
    lead = (slice(None),) * axis
    return [x[(*lead, slice(start, min(start + chunk_length, length)), ...)] for start in range(0, length, chunk_length)]


def feed_forward(xp, x: Any, params: dict, *, activation_name: str = "relu"):
    """``Dense(d_ff) -> activation -> Dense(d_model)`` with params ``dense_in``/``dense_out``."""
    hidden = activation(xp, activation_name, dense(xp, x, params["dense_in"]))
    return dense(xp, hidden, params["dense_out"])


def feed_forward_vjp(xp, x: Any, params: dict, *, activation_name: str = "relu"):
    """``(feed_forward(x), pullback)``; ``pullback(d_out) -> (d_params, d_x)``."""
    pre, in_pullback = dense_vjp(xp, x, params["dense_in"])
    hidden = activation(xp, activation_name, pre)
    out, out_pullback = dense_vjp(xp, hidden, params["dense_out"])

    def pullback(d_out):
        d_out_params, d_hidden = out_pullback(d_out)
        d_in_params, d_x = in_pullback(activation_backward(xp, activation_name, pre, d_hidden))
        return {"dense_in": d_in_params, "dense_out": d_out_params}, d_x

    return out, pullback
