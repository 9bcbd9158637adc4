"""Training-step memory on NumPy, counted exactly with tracemalloc (``reformer-core bench --memory``)."""

from __future__ import annotations

import numpy as np

from reformer_core import ReformerConfig, init_params, value_and_grad
from reformer_core.bench.memory import traced_peak, tree_nbytes

__all__ = ["training_step_memory"]


def training_step_memory(config: ReformerConfig, *, batch: int, length: int, reversible: bool = True,
                         seed: int = 0, dtype: str = "float32") -> dict:
    """Peak memory of one ``value_and_grad`` on NumPy, split into gradients and the rest.

    Parameters are made before tracing starts, so they are not counted; the gradients are
    allocated during the step and subtracted. What is left (``activation_bytes``) is the
    memory of activations and temporaries.
    """
    params = init_params(config, seed, backend="numpy", dtype=dtype)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, size=(batch, length))
    targets = rng.integers(0, config.vocab_size, size=(batch, length))
    (loss, grads), peak = traced_peak(
        lambda: value_and_grad(params, tokens, targets, config, rotations_seed=seed, reversible=reversible)
    )
    grad_bytes = tree_nbytes(grads)
    return {
        "layers": config.num_layers,
        "length": length,
        "batch": batch,
        "reversible": reversible,
        "peak_bytes": int(peak),
        "param_bytes": tree_nbytes(params),
        "grad_bytes": grad_bytes,
        "activation_bytes": int(peak - grad_bytes),
        "loss": float(loss),
    }
