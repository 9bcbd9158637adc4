"""Functions that carry their own vector-Jacobian product.

Backends without automatic differentiation (NumPy, CuPy, array_api_strict) differentiate
with these hand-written rules; PyTorch and JAX differentiate the same forward functions with
their own autodiff, and the conformance suite checks the two against each other.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["Differentiable", "rule_vjp"]


class Differentiable:
    """A pure function with a hand-written VJP.

    ``fn(*args)`` runs the forward; ``fn.vjp(*args)`` returns ``(out, pullback)`` where
    ``pullback(d_out)`` returns one gradient per argument (pytrees shaped like them).
    """

    __slots__ = ("forward", "rule", "name")

    def __init__(self, forward: Callable, rule: Callable, name: str = "") -> None:
        self.forward = forward
        self.rule = rule
        self.name = name or getattr(forward, "__name__", "function")

    def __call__(self, *args: Any) -> Any:
        return self.forward(*args)

    def vjp(self, *args: Any):
        return self.rule(*args)

    def __repr__(self) -> str:
        return f"<Differentiable {self.name}>"


def rule_vjp(fn: Any, *primals: Any):
    """``(fn(*primals), pullback)`` from ``fn``'s hand-written rule."""
    if not isinstance(fn, Differentiable):
        raise TypeError(
            f"{fn!r} has no hand-written VJP rule; wrap it in reformer_core.Differentiable, "
            f"or use a backend with automatic differentiation (torch, jax)"
        )
    return fn.vjp(*primals)
