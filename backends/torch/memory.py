"""Training-step memory of the torch backend against depth (``reformer-core bench --memory``).

On CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before. On the CPU:
resident memory sampled during the step, with glibc told to return every large block to the
system on free (``mallopt``), so RSS follows the live tensors.
"""

from __future__ import annotations

import gc

from reformer_core import apply, cross_entropy_loss, init_params
from reformer_core._tree import tree_leaves
from reformer_core.bench.depth import tokens_for
from reformer_core.bench.memory import rss_peak, tree_nbytes, unmap_large_blocks

__all__ = ["training_step_memory"]


def training_step_memory(backend, config, *, batch: int, length: int, reversible: bool) -> dict:
    """``{"bytes", "method"}``: one step's memory beyond parameters and gradients, for
    ``ReformerLM`` (reversible) or plain autograd through the core's forward (every
    activation stored)."""
    import torch

    fixed = backend.device.type == "cuda" or unmap_large_blocks()  # before anything is allocated
    tokens, targets = (torch.from_numpy(t).to(backend.device) for t in tokens_for(config, batch, length))
    if reversible:
        from .nn import ReformerLM

        model = ReformerLM(config, seed=0, device=backend.device)

        def step():
            logits = model(tokens)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
            return [p.grad for p in model.parameters()]
    else:
        params = init_params(config, 0, backend=backend)
        leaves = [leaf.requires_grad_(True) for leaf in tree_leaves(params)]

        def step():  # the core's forward under plain autograd: every activation is kept
            loss = cross_entropy_loss(apply(params, tokens, config, rotations_seed=0), targets)
            return torch.autograd.grad(loss, leaves)

    def reset():  # gradients of the step before are freed, so each step allocates its own
        if reversible:
            model.zero_grad(set_to_none=True)
        gc.collect()

    grad_bytes = tree_nbytes(list(step()))  # warm-up
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
