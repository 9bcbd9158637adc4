"""Training-step memory of the torch and JAX backends against depth, for
``reformer-core bench --memory`` (:mod:`reformer_core._depth_memory` picks these by backend
name; the core itself never imports a framework).

Each ``*_row(config, batch, length, mode, backend)`` returns ``{"bytes", "method"}``: the
step's memory beyond parameters and gradients, ``mode`` "reversible" (the backend's
reversible stack) or "stored" (plain autodiff of the core's forward, which keeps every
activation).
"""

from __future__ import annotations

import gc

import numpy as np

from reformer_core._depth_memory import tokens_for
from reformer_core._host_memory import rss_peak, unmap_large_blocks
from reformer_core._memory import _nbytes
from reformer_core.model import apply, cross_entropy_loss, init_params
from reformer_core.tree import tree_paths

__all__ = ["torch_row", "jax_row"]


def torch_row(config, batch, length, mode, backend) -> dict:
    import torch

    fixed = backend.device.type == "cuda" or unmap_large_blocks()  # before anything is allocated
    tokens, targets = (torch.from_numpy(t).to(backend.device) for t in tokens_for(config, batch, length))
    if mode == "reversible":
        from reformer_core.backends.torch_nn import ReformerLM

        model = ReformerLM(config, seed=0, device=backend.device)

        def step():
            logits = model(tokens)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
            return [p.grad for p in model.parameters()]
    else:
        params = init_params(config, 0, backend=backend)
        leaves = [leaf.requires_grad_(True) for _, leaf in tree_paths(params)]

        def step():  # the core's forward under plain autograd: every activation is kept
            loss = cross_entropy_loss(apply(params, tokens, config, rotations_seed=0), targets)
            return torch.autograd.grad(loss, leaves)

    def reset():  # gradients of the step before are freed, so each step allocates its own
        if mode == "reversible":
            model.zero_grad(set_to_none=True)
        gc.collect()

    grad_bytes = _nbytes(list(step()))  # warm-up
    peaks = []
    for _ in range(2):  # sampling can miss a short spike: the larger of two
        reset()
        if backend.device.type == "cuda":
            peaks.append(backend.peak_device_memory(step))
        else:
            peaks.append(rss_peak(step, backend.synchronize))
    reset()
    if backend.device.type == "cuda":
        method = "CUDA allocator peak - gradients"
    elif fixed:
        method = "sampled RSS (mallopt: large blocks unmapped on free) - gradients"
    else:
        method = "sampled RSS - gradients (allocator may keep freed memory)"
    peak = None if None in peaks else max(peaks)
    return {"bytes": None if peak is None else int(peak - grad_bytes), "method": method}


def jax_row(config, batch, length, mode, backend) -> dict:
    import jax

    from reformer_core.backends import jax_model

    params = init_params(config, 0, backend=backend)
    tokens, targets = (backend.from_numpy(t.astype(np.int32)) for t in tokens_for(config, batch, length))
    if mode == "reversible":
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
