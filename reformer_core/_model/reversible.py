"""Reversible residual layers (RevNet; Reformer section 3).

With ``F`` the attention block and ``G`` the feed-forward block of a layer::

    Y1 = X1 + F(X2)        X2 = Y2 - G(Y1)
    Y2 = X2 + G(Y1)        X1 = Y1 - F(X2)

so a layer's input can be rebuilt from its output and activations need not be stored: the
backward pass walks the layers in reverse, rebuilding each input and pulling gradients
through that one layer. ``F`` and ``G`` must be deterministic: randomness (rotations,
dropout masks) is bound into them so the recompute replays exactly what the forward did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = [
    "ReversibleLayer",
    "reversible_forward",
    "reversible_inverse",
    "reversible_backward",
    "reversible_backward_step",
    "stored_backward",
]


@dataclass(frozen=True)
class ReversibleLayer:
    """One layer: ``f(f_params, x)`` and ``g(g_params, x)``, each ``(batch, length, d)`` in and out."""

    f: Callable[[Any, Any], Any]
    g: Callable[[Any, Any], Any]
    f_params: Any = None
    g_params: Any = None

    def forward(self, x1: Any, x2: Any):
        y1 = x1 + self.f(self.f_params, x2)
        return y1, x2 + self.g(self.g_params, y1)

    def inverse(self, y1: Any, y2: Any):
        x2 = y2 - self.g(self.g_params, y1)
        return y1 - self.f(self.f_params, x2), x2


def reversible_forward(layers: Sequence[ReversibleLayer], x1: Any, x2: Any):
    """Run the layers forward, keeping only the current pair ``(Y1, Y2)``."""
    for layer in layers:
        x1, x2 = layer.forward(x1, x2)
    return x1, x2


def reversible_inverse(layers: Sequence[ReversibleLayer], y1: Any, y2: Any):
    """Rebuild the stack's input from its output, last layer first."""
    for layer in reversed(layers):
        y1, y2 = layer.inverse(y1, y2)
    return y1, y2


def reversible_backward(layers: Sequence[ReversibleLayer], y1: Any, y2: Any, d_y1: Any, d_y2: Any, *,
                        vjp: Callable):
    """Gradients of the stack from its outputs alone.

    Per layer, last first: recompute ``G(Y1)`` and pull ``dY2`` back through it
    (``dY1 += G'^T dY2``), rebuild ``X2 = Y2 - G(Y1)``, recompute ``F(X2)`` and pull the new
    ``dY1`` back through it (``dX2 = dY2 + F'^T dY1``), rebuild ``X1 = Y1 - F(X2)``. Only one
    layer's intermediates are alive at a time, so activation memory does not grow with depth.

    Args:
        layers: the stack, as run forward.
        y1: its first output.
        y2: its second output.
        d_y1: the cotangent of ``y1``.
        d_y2: the cotangent of ``y2``.
        vjp: ``vjp(fn, params, x) -> (fn(params, x), pullback)`` with
            ``pullback(d_out) -> (d_params, d_x)``: the backend's differentiation.

    Returns:
        ``((x1, x2), (d_x1, d_x2), grads)``: the rebuilt inputs, their cotangents, and per
        layer ``(d_f_params, d_g_params)``.
    """
    grads = []
    for layer in reversed(layers):
        (y1, y2), (d_y1, d_y2), layer_grads = reversible_backward_step(layer, y1, y2, d_y1, d_y2, vjp=vjp)
        grads.append(layer_grads)
    grads.reverse()
    return (y1, y2), (d_y1, d_y2), grads


def reversible_backward_step(layer: ReversibleLayer, y1: Any, y2: Any, d_y1: Any, d_y2: Any, *, vjp: Callable):
    """One layer of :func:`reversible_backward`: ``((x1, x2), (d_x1, d_x2), (d_f_params, d_g_params))``.

    The loop body on its own, for backends that run the loop themselves (a ``lax.scan``).
    """
    g_out, g_pullback = vjp(layer.g, layer.g_params, y1)
    d_g_params, d_from_g = g_pullback(d_y2)
    del g_pullback  # free G's intermediates before F's are made
    x2 = y2 - g_out
    d_y1 = d_y1 + d_from_g
    f_out, f_pullback = vjp(layer.f, layer.f_params, x2)
    d_f_params, d_from_f = f_pullback(d_y1)
    del f_pullback
    x1 = y1 - f_out
    d_y2 = d_y2 + d_from_f
    return (x1, x2), (d_y1, d_y2), (d_f_params, d_g_params)


def stored_backward(layers: Sequence[ReversibleLayer], x1: Any, x2: Any, d_y1_fn: Callable, *, vjp: Callable):
    """The same gradients computed the ordinary way, storing every layer's activations.

    A reference for tests and the memory benchmark (its activation memory grows with depth).
    ``d_y1_fn(y1, y2) -> (d_y1, d_y2)`` gives the output cotangents once the forward is done.

    Returns ``((y1, y2), (d_x1, d_x2), grads)``.
    """
    tape = []
    for layer in layers:
        f_out, f_pullback = vjp(layer.f, layer.f_params, x2)
        y1 = x1 + f_out
        g_out, g_pullback = vjp(layer.g, layer.g_params, y1)
        tape.append((f_pullback, g_pullback))
        x1, x2 = y1, x2 + g_out
    d_y1, d_y2 = d_y1_fn(x1, x2)
    grads = []
    for f_pullback, g_pullback in reversed(tape):
        d_g_params, d_from_g = g_pullback(d_y2)
        d_y1 = d_y1 + d_from_g
        d_f_params, d_from_f = f_pullback(d_y1)
        d_y2 = d_y2 + d_from_f
        grads.append((d_f_params, d_g_params))
    grads.reverse()
    return (x1, x2), (d_y1, d_y2), grads
