"""Memory against depth and length (``reformer-core bench --memory``).

Reversible layers keep activation memory flat in depth, and a chunked feed-forward's
backward keeps it flat in length: the paper's memory claims, measured here.

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
  step uses the scanned parameter layout (``model.stack_layers``).
* cupy: the memory pool's peak above the gradients.

Each measurement lives with its framework, in ``backends/<framework>/memory.py``, behind the
adapter method ``Backend.training_step_memory``; this module only asks each backend.
"""

from __future__ import annotations

import gc
import platform

import numpy as np

from reformer_core import ReformerConfig, init_params
from reformer_core._model.blocks import feed_forward_block_vjp
from reformer_core._registry import resolve_backend

from .memory import traced_peak, tree_nbytes

__all__ = ["depth_memory_config", "tokens_for", "backend_memory_vs_depth", "memory_vs_depth", "memory_rows",
           "feed_forward_backward_memory", "memory_report", "format_memory_report", "format_depth_rows"]

MODES = ("reversible", "stored")


def depth_memory_config(depth: int, *, quick: bool = False) -> ReformerConfig:
    """The model the depth rows use: the issue's size (d_model 256, 4 heads, LSH-2, chunk 64)."""
    d_model = 64 if quick else 256
    return ReformerConfig(vocab_size=256, d_model=d_model, num_heads=4, head_dim=d_model // 4, d_ff=4 * d_model,
                          attention_layers=("lsh",) * depth, num_hashes=2, lsh_chunk_length=64, causal=True,
                          ff_chunk_length=512, axial_pos_shape=(64, 64))


def tokens_for(config: ReformerConfig, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The tokens and targets every memory measurement uses (seeded, int64)."""
    rng = np.random.default_rng(0)
    return (rng.integers(0, config.vocab_size, (batch, length)), rng.integers(0, config.vocab_size, (batch, length)))


def backend_memory_vs_depth(backend_spec: str, depths=(2, 4, 8, 12), *, length: int = 4096, batch: int = 1,
                            quick: bool = False, modes=MODES, progress=None) -> list[dict]:
    """Rows ``{"backend", "layers", "mode", "bytes", "method", ...}`` for one backend spec.
    ``progress``: an object with ``step(message)``, told before each row."""
    backend = resolve_backend(backend_spec)
    rows = []
    for mode in modes:
        for depth in depths:
            if progress is not None:
                progress.step(f"{backend_spec} {mode} {depth} layers L={length}")
            config = depth_memory_config(depth, quick=quick)
            try:
                row = backend.training_step_memory(config, batch=batch, length=length, reversible=mode == "reversible")
            except NotImplementedError as error:
                raise ValueError(str(error)) from None
            rows.append({"backend": backend_spec, "layers": depth, "mode": mode, "length": length, "batch": batch,
                         "d_model": config.d_model, **row})
            gc.collect()
    return rows


def memory_vs_depth(config: ReformerConfig, depths=(2, 4, 8, 12), *, batch: int, length: int,
                    reversible: bool = True, dtype: str = "float32") -> list[dict]:
    """NumPy's training-step memory (exact, tracemalloc) for stacks of each depth (the layer
    kinds of ``config`` repeated); rows of ``backends.numpy.memory.training_step_memory``."""
    from reformer_core.backends.numpy.memory import training_step_memory

    kinds = config.attention_layers
    rows = []
    for depth in depths:
        layers = tuple(kinds[i % len(kinds)] for i in range(depth))
        rows.append(training_step_memory(config.replace(attention_layers=layers), batch=batch, length=length,
                                         reversible=reversible, dtype=dtype))
    return rows


def feed_forward_backward_memory(config: ReformerConfig, *, batch: int, length: int, seed: int = 0,
                                 dtype: str = "float32") -> dict:
    """Peak memory of one feed-forward block's forward and backward on NumPy, beyond its
    inputs and outputs.

    The block's output and input gradient are ``(batch, length, d_model)`` and must exist;
    they are subtracted, leaving the intermediates (``d_ff``-wide hidden activations), which
    ``ff_chunk_length`` bounds.
    """
    from array_api_compat import numpy as xp

    params = init_params(config, seed, backend="numpy", dtype=dtype)["layers"][0]["feed_forward"]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, length, config.d_model)).astype(dtype)
    d_out = rng.standard_normal((batch, length, config.d_model)).astype(dtype)

    def step():
        out, pullback = feed_forward_block_vjp(xp, params, x, config)
        grads, d_x = pullback(d_out)
        return out, grads, d_x

    (out, grads, d_x), peak = traced_peak(step)
    boundary = int(out.nbytes + d_x.nbytes + tree_nbytes(grads))
    return {"length": length, "ff_chunk_length": config.ff_chunk_length, "peak_bytes": int(peak),
            "boundary_bytes": boundary, "intermediate_bytes": int(peak - boundary)}


def memory_rows(*, backends=("numpy",), depths=(2, 4, 8, 12), quick: bool = False, lengths=None) -> int:
    """How many rows :func:`memory_report` measures (for a progress display)."""
    lengths = lengths or ((256, 1024) if quick else (256, 1024, 4096))
    return len(backends) * len(MODES) * len(depths) + 2 * len(lengths)


def memory_report(*, quick: bool = False, backends=("numpy",), depths=(2, 4, 8, 12), length: int | None = None,
                  lengths=None, progress=None) -> dict:
    """The ``bench --memory`` measurements: training-step memory against depth on each backend
    (reversible and storing every activation) and NumPy's feed-forward backward memory
    against length (chunked or not). ``progress``: told (``step``) before each row."""
    length = length or (1024 if quick else 4096)
    depth_rows = []
    for spec in backends:
        depth_rows += backend_memory_vs_depth(spec, depths, length=length, quick=quick, progress=progress)
    ff_config = ReformerConfig(vocab_size=16, d_model=32, num_heads=2, head_dim=16, d_ff=1024,
                               attention_layers=("local",), axial_pos_shape=(64, 64))
    lengths = lengths or ((256, 1024) if quick else (256, 1024, 4096))
    ff_rows = []
    for chunk in (64, None):
        for n in lengths:
            if progress is not None:
                progress.step(f"numpy feed-forward backward L={n} {'unchunked' if chunk is None else f'chunk {chunk}'}")
            ff_rows.append(feed_forward_backward_memory(ff_config.replace(ff_chunk_length=chunk), batch=2, length=n))
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
    mib = 2.0**20
    lines = [format_depth_rows(report["depth"]),
             "feed-forward block forward+backward on NumPy: intermediates beyond inputs/outputs (d_ff 1024)",
             f"{'length':>6}  {'ff_chunk_length=64':>22}  {'unchunked':>22}"]
    ff = {(row["ff_chunk_length"], row["length"]): row for row in report["feed_forward"]}
    lengths = sorted({row["length"] for row in report["feed_forward"]})
    for n in lengths:
        cells = []
        for chunk in (64, None):
            row, first = ff[(chunk, n)], ff[(chunk, lengths[0])]
            cells.append(f"{row['intermediate_bytes'] / mib:8.2f} MiB "
                         f"({row['intermediate_bytes'] / first['intermediate_bytes']:4.2f}x)")
        lines.append(f"{n:>6}  {cells[0]:>22}  {cells[1]:>22}")
    return "\n".join(lines)


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
