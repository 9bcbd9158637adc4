"""Training-step memory against depth on every backend (``reformer-core bench --memory``).

One row per (backend, depth, mode): the memory of one training step's forward and backward
beyond what must exist anyway (parameters, and the gradients the step returns), for the
reversible stack and, as the baseline, plain autodiff that stores every layer's activations.

How each backend is measured:

* numpy: tracemalloc (NumPy reports its allocations to it); activations = peak - gradients.
* torch on CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before.
* torch on the CPU: resident memory sampled during the step, with glibc told to return
  every large block to the system on free (``mallopt``), so RSS follows the live tensors.
* jax: the compiled step's temporary buffers (``compiled.memory_analysis()``), which exclude
  the arguments (parameters) and outputs (loss and gradients) by construction. The reversible
  step uses the scanned parameter layout (``jax_model.stack_layers``).

The torch and JAX measurements live in ``backends/_training_memory.py``, beside the
framework code; this module only picks them by backend name.
"""

from __future__ import annotations

import gc

import numpy as np

from .config import ReformerConfig

__all__ = ["depth_memory_config", "backend_memory_vs_depth"]

MODES = ("reversible", "stored")


def depth_memory_config(depth: int, *, quick: bool = False) -> ReformerConfig:
    """The model the depth rows use: the issue's size (d_model 256, 4 heads, LSH-2, chunk 64)."""
    d_model = 64 if quick else 256
    return ReformerConfig(vocab_size=256, d_model=d_model, num_heads=4, head_dim=d_model // 4, d_ff=4 * d_model,
                          attention_layers=("lsh",) * depth, num_hashes=2, lsh_chunk_length=64, causal=True,
                          ff_chunk_length=512, axial_pos_shape=(64, 64))


def tokens_for(config: ReformerConfig, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.integers(0, config.vocab_size, (batch, length)), rng.integers(0, config.vocab_size, (batch, length)))


def _numpy_row(config, batch, length, mode) -> dict:
    from ._memory import training_step_memory

    row = training_step_memory(config, batch=batch, length=length, reversible=mode == "reversible")
    return {"bytes": row["activation_bytes"], "method": "tracemalloc, peak - gradients"}


def _framework_row(name: str):
    """The measurement of a framework backend, kept in ``backends/`` with the framework code."""
    if name not in ("torch", "jax"):
        return None
    from reformer_core.backends import _training_memory

    return getattr(_training_memory, f"{name}_row")


def backend_memory_vs_depth(backend_spec: str, depths=(2, 4, 8, 12), *, length: int = 4096, batch: int = 1,
                            quick: bool = False, modes=MODES) -> list[dict]:
    """Rows ``{"backend", "layers", "mode", "bytes", "method", ...}`` for one backend spec."""
    from .backend import resolve_backend

    backend = resolve_backend(backend_spec)
    measure = _numpy_row if backend.name == "numpy" else _framework_row(backend.name)
    if measure is None:
        raise ValueError(f"bench --memory measures numpy, torch and jax; {backend.name!r} is not supported yet")
    rows = []
    for mode in modes:
        for depth in depths:
            config = depth_memory_config(depth, quick=quick)
            if backend.name == "numpy":
                row = measure(config, batch, length, mode)
            else:
                row = measure(config, batch, length, mode, backend)
            rows.append({"backend": backend_spec, "layers": depth, "mode": mode, "length": length, "batch": batch,
                         "d_model": config.d_model, **row})
            gc.collect()
    return rows


def format_depth_rows(rows: list[dict]) -> str:
    """One line per (backend, depth): reversible and stored bytes, each against the first depth."""
    mib = 2.0**20
    lines = []
    for spec in dict.fromkeys(row["backend"] for row in rows):
        mine = {(row["mode"], row["layers"]): row for row in rows if row["backend"] == spec}
        depths = sorted({layers for _, layers in mine})
        first = next(iter(mine.values()))
        lines.append(f"{spec}: training-step memory beyond parameters and gradients, L={first['length']}, "
                     f"batch {first['batch']}, d_model {first['d_model']} ({first['method']})")
        lines.append(f"{'layers':>6}  {'reversible':>22}  {'storing activations':>22}")
        for depth in depths:
            cells = []
            for mode in MODES:
                row, base = mine.get((mode, depth)), mine.get((mode, depths[0]))
                if row is None or row["bytes"] is None:
                    cells.append("-")
                else:
                    ratio = row["bytes"] / base["bytes"] if base and base["bytes"] else float("nan")
                    cells.append(f"{row['bytes'] / mib:8.1f} MiB ({ratio:4.2f}x)")
            lines.append(f"{depth:>6}  {cells[0]:>22}  {cells[1]:>22}")
        lines.append("")
    return "\n".join(lines)
