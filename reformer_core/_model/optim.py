"""Adam, written against the Array API, for training on any backend (NumPy and CuPy above all)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from .._arrays import framework_of, namespace
from .._tree import tree_leaves, tree_map

__all__ = ["Adam", "warmup_inverse_sqrt"]


def warmup_inverse_sqrt(peak: float, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up to ``peak`` over ``warmup_steps``, then ``peak * sqrt(warmup / step)``."""
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")

    def schedule(step: int) -> float:
        step = max(step, 1)
        return peak * min(step / warmup_steps, math.sqrt(warmup_steps / step))

    return schedule


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma and Ba) with bias correction and optional decoupled weight decay (AdamW).

    Functional: ``state = opt.init(params)``; ``params, state = opt.update(params, grads, state)``.
    The state is ``{"step": int, "m": pytree, "v": pytree}``, arrays shaped like the params.

    Args:
        learning_rate: a float, or a function of the (1-based) step.
        beta1: decay of the first-moment average.
        beta2: decay of the second-moment average.
        eps: the denominator guard.
        weight_decay: decoupled decay, applied as ``p -= lr * weight_decay * p``.
    """

    learning_rate: float | Callable[[int], float] = 1e-3
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-9
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.eps <= 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")

    def init(self, params: Any) -> dict:
        xp = _tree_namespace(params)
        return {"step": 0, "m": tree_map(xp.zeros_like, params), "v": tree_map(xp.zeros_like, params)}

    def learning_rate_at(self, step: int) -> float:
        rate = self.learning_rate(step) if callable(self.learning_rate) else self.learning_rate
        return float(rate)

    def update(self, params: Any, grads: Any, state: dict):
        """One step: returns ``(new_params, new_state)``; the inputs are not modified."""
        xp = _tree_namespace(params, grads)
        step = int(state["step"]) + 1
        rate = self.learning_rate_at(step)
        b1, b2 = self.beta1, self.beta2
        m = tree_map(lambda m_, g: b1 * m_ + (1.0 - b1) * g, state["m"], grads)
        v = tree_map(lambda v_, g: b2 * v_ + (1.0 - b2) * (g * g), state["v"], grads)
        scale = rate * math.sqrt(1.0 - b2**step) / (1.0 - b1**step)
        eps_hat = self.eps * math.sqrt(1.0 - b2**step)  # eps on the bias-corrected denominator

        def step_leaf(p, m_, v_):
            p_new = p - scale * m_ / (xp.sqrt(v_) + eps_hat)
            if self.weight_decay:
                p_new = p_new - (rate * self.weight_decay) * p
            return p_new

        return tree_map(step_leaf, params, m, v), {"step": step, "m": m, "v": v}


def _tree_namespace(*trees):
    leaves = [leaf for tree in trees for leaf in tree_leaves(tree)]
    if not leaves:
        raise ValueError("the parameter tree has no arrays")
    frameworks = {framework_of(leaf) for leaf in leaves}
    if len(frameworks) != 1:
        raise TypeError(f"params and grads mix frameworks {sorted(map(str, frameworks))}")
    return namespace(leaves[0])
