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
"""

from __future__ import annotations

import gc

import numpy as np

from ._host_memory import rss_peak, unmap_large_blocks
from ._memory import _nbytes
from .config import ReformerConfig
from .tree import tree_paths

__all__ = ["depth_memory_config", "backend_memory_vs_depth"]

MODES = ("reversible", "stored")


def depth_memory_config(depth: int, *, quick: bool = False) -> ReformerConfig:
    """The model the depth rows use: the issue's size (d_model 256, 4 heads, LSH-2, chunk 64)."""
    d_model = 64 if quick else 256
    return ReformerConfig(vocab_size=256, d_model=d_model, num_heads=4, head_dim=d_model // 4, d_ff=4 * d_model,
                          attention_layers=("lsh",) * depth, num_hashes=2, lsh_chunk_length=64, causal=True,
                          ff_chunk_length=512, axial_pos_shape=(64, 64))


def _tokens(config: ReformerConfig, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.integers(0, config.vocab_size, (batch, length)), rng.integers(0, config.vocab_size, (batch, length)))


def _numpy_row(config, batch, length, mode) -> dict:
    from ._memory import training_step_memory

    row = training_step_memory(config, batch=batch, length=length, reversible=mode == "reversible")
    return {"bytes": row["activation_bytes"], "method": "tracemalloc, peak - gradients"}


def _torch_row(config, batch, length, mode, backend) -> dict:
    import torch

    from .model import init_params

    fixed = backend.device.type == "cuda" or unmap_large_blocks()  # before anything is allocated
    tokens, targets = (torch.from_numpy(t).to(backend.device) for t in _tokens(config, batch, length))
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
            loss = _plain_loss(params, tokens, targets, config)
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


def _plain_loss(params, tokens, targets, config):
    from .model import apply, cross_entropy_loss

    return cross_entropy_loss(apply(params, tokens, config, rotations_seed=0), targets)


def _jax_row(config, batch, length, mode, backend) -> dict:
    import jax

    from reformer_core.backends import jax_model

    from .model import init_params

    params = init_params(config, 0, backend=backend)
    tokens, targets = (backend.from_numpy(t.astype(np.int32)) for t in _tokens(config, batch, length))
    if mode == "reversible":
        params = jax_model.stack_layers(params, config)
        randomness = jax_model.step_randomness(config, 0, batch=batch, length=length, like=params)
        step = jax.jit(jax_model.loss_and_grad, static_argnames="config")
        lowered = step.lower(params, tokens, targets, config, **randomness)
    else:
        rotations = jax_model.step_randomness(config, 0, batch=batch, length=length, like=params)["rotations"]

        def plain(params, tokens, targets, rotations):  # jax.grad of the core's forward: XLA keeps activations
            from .model import apply, cross_entropy_loss

            return cross_entropy_loss(apply(params, tokens, config, rotations=rotations, check_values=False), targets)

        lowered = jax.jit(jax.value_and_grad(plain)).lower(params, tokens, targets, rotations)
    analysis = lowered.compile().memory_analysis()
    if analysis is None:
        return {"bytes": None, "method": "this jax build reports no memory analysis"}
    return {"bytes": int(analysis.temp_size_in_bytes), "method": "XLA temp buffers of the compiled step"}


_ROWS = {"numpy": _numpy_row, "torch": _torch_row, "jax": _jax_row}


def backend_memory_vs_depth(backend_spec: str, depths=(2, 4, 8, 12), *, length: int = 4096, batch: int = 1,
                            quick: bool = False, modes=MODES) -> list[dict]:
    """Rows ``{"backend", "layers", "mode", "bytes", "method", ...}`` for one backend spec."""
    from .backend import resolve_backend

    backend = resolve_backend(backend_spec)
    measure = _ROWS.get(backend.name)
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
