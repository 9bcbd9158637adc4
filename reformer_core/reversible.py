"""Reversible residual layers (RevNet; Reformer section 3).

With ``F`` the attention block and ``G`` the feed-forward block of a layer::

    Y1 = X1 + F(X2)        X2 = Y2 - G(Y1)
    Y2 = X2 + G(Y1)        X1 = Y1 - F(X2)

so a layer's input can be rebuilt from its output and activations need not be stored.
``F`` and ``G`` must be deterministic: randomness (rotations, dropout masks) is bound into
them explicitly so the inverse replays exactly what the forward did.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

__all__ = ["reversible_layer", "reversible_layer_inverse", "reversible_forward", "reversible_inverse"]

Block = Callable[[Any], Any]


def reversible_layer(f: Block, g: Block, x1: Any, x2: Any):
    y1 = x1 + f(x2)
    return y1, x2 + g(y1)


def reversible_layer_inverse(f: Block, g: Block, y1: Any, y2: Any):
    x2 = y2 - g(y1)
    return y1 - f(x2), x2


def reversible_forward(blocks: Sequence[tuple[Block, Block]], x1: Any, x2: Any):
    """Run layers ``[(F_1, G_1), ...]`` forward, keeping only the current pair."""
    for f, g in blocks:
        x1, x2 = reversible_layer(f, g, x1, x2)
    return x1, x2


def reversible_inverse(blocks: Sequence[tuple[Block, Block]], y1: Any, y2: Any):
    """Rebuild the stack's input from its output, last layer first."""
    for f, g in reversed(blocks):
        y1, y2 = reversible_layer_inverse(f, g, y1, y2)
    return y1, y2
