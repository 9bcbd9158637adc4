"""Device memory on CuPy, read from its default memory pool (``reformer-core bench``)."""

from __future__ import annotations

from reformer_core import init_params, value_and_grad
from reformer_core.bench.depth import tokens_for
from reformer_core.bench.memory import tree_nbytes

__all__ = ["pool_peak", "training_step_memory"]


def pool_peak(backend, fn) -> int:
    """Bytes the memory pool grew to during ``fn()`` (the pool keeps freed blocks, so its
    total after the call is the peak of the call when it starts empty)."""
    import cupy

    pool = cupy.get_default_memory_pool()
    backend.synchronize()
    pool.free_all_blocks()
    before = pool.total_bytes()
    out = fn()
    backend.synchronize()
    del out
    return int(pool.total_bytes() - before)


def training_step_memory(backend, config, *, batch: int, length: int, reversible: bool) -> dict:
    """``{"bytes", "method"}``: one ``value_and_grad`` step's pool peak beyond the gradients
    (the parameters exist before the step and are not counted)."""
    params = init_params(config, 0, backend=backend)
    tokens, targets = (backend.from_numpy(t) for t in tokens_for(config, batch, length))
    result = {}

    def step():
        result["grads"] = value_and_grad(params, tokens, targets, config, rotations_seed=0, reversible=reversible)[1]
        return result["grads"]

    peak = pool_peak(backend, step)
    return {"bytes": int(peak - tree_nbytes(result["grads"])), "method": "CuPy memory pool peak - gradients"}
