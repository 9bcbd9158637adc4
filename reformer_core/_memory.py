"""Peak-memory measurements of training (NumPy, via tracemalloc, which NumPy reports to).

Used by ``reformer-core bench --memory`` and by the tests that assert the paper's claim:
with reversible layers, activation memory does not grow with the number of layers, and a
chunked feed-forward's backward does not grow with the sequence length.
"""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import numpy as np

from .config import ReformerConfig
from .tree import tree_paths

__all__ = ["traced_peak", "training_step_memory", "feed_forward_backward_memory", "memory_vs_depth"]


def _nbytes(tree: Any) -> int:
    return sum(int(leaf.nbytes) for _, leaf in tree_paths(tree))


def traced_peak(fn):
    """Run ``fn`` under tracemalloc; returns ``(result, peak bytes allocated during the call)``."""
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return result, max(0, peak - base)


def training_step_memory(config: ReformerConfig, *, batch: int, length: int, reversible: bool = True,
                         seed: int = 0, dtype: str = "float32") -> dict:
    """Peak memory of one ``value_and_grad`` on NumPy, split into gradients and the rest.

    Parameters are made before tracing starts, so they are not counted; the gradients are
    allocated during the step and subtracted. What is left (``activation_bytes``) is the
    memory of activations and temporaries.
    """
    from .backend import resolve_backend
    from .model import init_params
    from .training import value_and_grad

    backend = resolve_backend("numpy")
    params = init_params(config, seed, backend=backend, dtype=dtype)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, size=(batch, length))
    targets = rng.integers(0, config.vocab_size, size=(batch, length))
    (loss, grads), peak = traced_peak(
        lambda: value_and_grad(params, tokens, targets, config, rotations_seed=seed, reversible=reversible)
    )
    grad_bytes = _nbytes(grads)
    return {
        "layers": config.num_layers,
        "length": length,
        "batch": batch,
        "reversible": reversible,
        "peak_bytes": int(peak),
        "param_bytes": _nbytes(params),
        "grad_bytes": grad_bytes,
        "activation_bytes": int(peak - grad_bytes),
        "loss": float(loss),
    }


def memory_vs_depth(config: ReformerConfig, depths=(2, 4, 8, 12), *, batch: int, length: int,
                    reversible: bool = True, dtype: str = "float32") -> list[dict]:
    """:func:`training_step_memory` for stacks of each depth (the layer kinds of ``config`` repeated)."""
    kinds = config.attention_layers
    rows = []
    for depth in depths:
        layers = tuple(kinds[i % len(kinds)] for i in range(depth))
        rows.append(training_step_memory(config.replace(attention_layers=layers), batch=batch, length=length,
                                         reversible=reversible, dtype=dtype))
    return rows


def feed_forward_backward_memory(config: ReformerConfig, *, batch: int, length: int, seed: int = 0,
                                 dtype: str = "float32") -> dict:
    """Peak memory of one feed-forward block's forward and backward, beyond its inputs and outputs.

    The block's output and input gradient are ``(batch, length, d_model)`` and must exist;
    they are subtracted, leaving the intermediates (``d_ff``-wide hidden activations), which
    ``ff_chunk_length`` bounds.
    """
    from array_api_compat import numpy as xp

    from .blocks import feed_forward_block_vjp
    from .model import init_params

    params = init_params(config, seed, dtype=dtype)["layers"][0]["feed_forward"]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, length, config.d_model)).astype(dtype)
    d_out = rng.standard_normal((batch, length, config.d_model)).astype(dtype)

    def step():
        out, pullback = feed_forward_block_vjp(xp, params, x, config)
        grads, d_x = pullback(d_out)
        return out, grads, d_x

    (out, grads, d_x), peak = traced_peak(step)
    boundary = int(out.nbytes + d_x.nbytes + _nbytes(grads))
    return {"length": length, "ff_chunk_length": config.ff_chunk_length, "peak_bytes": int(peak),
            "boundary_bytes": boundary, "intermediate_bytes": int(peak - boundary)}


def memory_report(*, quick: bool = False, backends=("numpy",), depths=(2, 4, 8, 12), length: int | None = None,
                  lengths=None) -> dict:
    """The ``bench --memory`` measurements: training-step memory against depth on each backend
    (reversible and storing every activation, :mod:`reformer_core._depth_memory`) and NumPy's
    feed-forward backward memory against length (chunked or not)."""
    import platform

    from ._depth_memory import backend_memory_vs_depth, depth_memory_config

    length = length or (1024 if quick else 4096)
    depth_rows = []
    for spec in backends:
        depth_rows += backend_memory_vs_depth(spec, depths, length=length, quick=quick)
    ff_config = ReformerConfig(vocab_size=16, d_model=32, num_heads=2, head_dim=16, d_ff=1024,
                               attention_layers=("local",), axial_pos_shape=(64, 64))
    lengths = lengths or ((256, 1024) if quick else (256, 1024, 4096))
    ff_rows = [feed_forward_backward_memory(ff_config.replace(ff_chunk_length=chunk), batch=2, length=n)
               for chunk in (64, None) for n in lengths]
    return {
        "schema": "reformer-core-bench-memory/2",
        "settings": {"depth_config": depth_memory_config(depths[0], quick=quick).to_dict(), "batch": 1,
                     "length": length, "depths": list(depths), "backends": list(backends),
                     "ff_config": ff_config.to_dict()},
        "hardware": {"platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__},
        "depth": depth_rows,
        "feed_forward": ff_rows,
    }


def format_memory_report(report: dict) -> str:
    from ._depth_memory import format_depth_rows

    mib = 2.0**20
    lines = [format_depth_rows(report["depth"]),
             "feed-forward block forward+backward on NumPy: intermediates beyond inputs/outputs (d_ff 1024)",
             f"{'length':>6}  {'ff_chunk_length=64':>22}  {'unchunked':>22}"]
    ff = {(row["ff_chunk_length"], row["length"]): row for row in report["feed_forward"]}
    lengths = sorted({row["length"] for row in report["feed_forward"]})
    for n in lengths:
        cells = [f"{ff[(chunk, n)]['intermediate_bytes'] / mib:8.2f} MiB ({ff[(chunk, n)]['intermediate_bytes'] / ff[(chunk, lengths[0])]['intermediate_bytes']:4.2f}x)"
                 for chunk in (64, None)]
        lines.append(f"{n:>6}  {cells[0]:>22}  {cells[1]:>22}")
    return "\n".join(lines)
