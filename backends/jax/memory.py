"""Training-step memory of the JAX backend against depth (``reformer-core bench --memory``):
the compiled step's temporary buffers (``compiled.memory_analysis()``), which exclude the
arguments (parameters) and outputs (loss and gradients) by construction. The reversible step
uses the scanned parameter layout (``model.stack_layers``)."""

from __future__ import annotations

import numpy as np

from reformer_core import apply, cross_entropy_loss, init_params
from reformer_core.bench.depth import tokens_for

__all__ = ["training_step_memory"]


def training_step_memory(backend, config, *, batch: int, length: int, reversible: bool) -> dict:
    """``{"bytes", "method"}``: XLA's temporary buffers of one jitted training step."""
    import jax

    from . import model as jax_model

    params = init_params(config, 0, backend=backend)
    tokens, targets = (backend.from_numpy(t.astype(np.int32)) for t in tokens_for(config, batch, length))
    if reversible:
        params = jax_model.stack_layers(params, config)
        randomness = jax_model.step_randomness(config, 0, batch=batch, length=length, like=params)
        step = jax.jit(jax_model.loss_and_grad, static_argnames="config")
        lowered = step.lower(params, tokens, targets, config, **randomness)
    else:
        rotations = jax_model.step_randomness(config, 0, batch=batch, length=length, like=params)["rotations"]

        def plain(params, tokens, targets, rotations):  # jax.grad of the core's forward: XLA keeps activations
            return cross_entropy_loss(apply(params, tokens, config, rotations=rotations, check_values=False), targets)

        lowered = jax.jit(jax.value_and_grad(plain)).lower(params, tokens, targets, rotations)
    analysis = lowered.compile().memory_analysis()
    if analysis is None:
        return {"bytes": None, "method": "this jax build reports no memory analysis"}
    return {"bytes": int(analysis.temp_size_in_bytes), "method": "XLA temp buffers of the compiled step"}
