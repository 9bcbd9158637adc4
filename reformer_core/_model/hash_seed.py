"""The LSH rotations HF transformers draws when its config sets ``hash_seed``.

HF's ``LSHSelfAttention._hash_vectors`` calls ``torch.manual_seed(hash_seed)`` and then
``torch.randn((heads, head_dim, num_hashes, rotation_size // 2))`` in the dtype of the
vectors it hashes, at every call of every LSH layer: all LSH layers hash with the same
rotations, every call. That layout is the core's rotation layout, so reproducing HF needs
only torch's generator (CPU, mt19937), which NumPy cannot replay; torch is imported here,
when a config with ``hash_seed`` runs, and never otherwise.
"""

from __future__ import annotations

from typing import Any

from .._config import ReformerConfig, rotation_size

__all__ = ["hash_seed_rotations"]

_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


def _dtype_name(dtype: Any) -> str:
    name = str(dtype).rsplit(".", 1)[-1]  # "torch.float32", "float32", "array_api_strict.float64", ...
    if name in _DTYPE_NAMES:
        return name
    raise TypeError(f"hash_seed rotations need a floating dtype ({', '.join(_DTYPE_NAMES)}), got {dtype!r}")


def hash_seed_rotations(config: ReformerConfig, length: int, *, like: Any) -> list:
    """HF's rotations for ``config.hash_seed``: one (identical) entry per LSH layer, None else.

    Drawn by torch's CPU generator in ``like``'s dtype (as HF draws in its activations'
    dtype; float32 and float64 draws differ), then moved to ``like``'s backend and device.
    HF running on a GPU draws from the GPU's generator instead, whose numbers differ.
    """
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"config.hash_seed={config.hash_seed} reproduces HF transformers' LSH rotations, which come from "
            f"torch's random generator: install torch (pip install 'reformer-core[torch]'), or use a config with "
            f"hash_seed=None (config.replace(hash_seed=None)) to hash with reformer-core's own seeded rotations"
        ) from None
    from .._registry import backend_for

    name = _dtype_name(like.dtype)
    num_buckets = config.num_buckets_for(length)
    shape = (config.num_heads, config.head_dim, config.num_hashes, rotation_size(num_buckets) // 2)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(config.hash_seed)
    drawn = torch.randn(shape, generator=generator, dtype=getattr(torch, name))
    # Widening to float64 and casting back is exact, and lets any backend take the numbers.
    rotations = backend_for(like).from_numpy(drawn.to(torch.float64).numpy(), dtype=like.dtype)
    return [rotations if kind == "lsh" else None for kind in config.attention_layers]
