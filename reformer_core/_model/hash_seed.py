"""The LSH rotations HF transformers draws when its config sets ``hash_seed``.

HF's ``LSHSelfAttention._hash_vectors`` calls ``torch.manual_seed(hash_seed)`` and then
``torch.randn((heads, head_dim, num_hashes, rotation_size // 2))`` in the dtype of the
vectors it hashes, at every call of every LSH layer: all LSH layers hash with the same
rotations, every call. That layout is the core's rotation layout, so reproducing HF needs
only torch's generator (CPU, mt19937), which NumPy cannot replay; the torch adapter draws
the numbers (``Backend.hash_seed_normal``), when a config with ``hash_seed`` runs.
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
    from .._registry import backend_for, framework_call

    name = _dtype_name(like.dtype)
    num_buckets = config.num_buckets_for(length)
    shape = (config.num_heads, config.head_dim, config.num_hashes, rotation_size(num_buckets) // 2)
    drawn = framework_call(
        "torch", "hash_seed_normal", shape, config.hash_seed, name,
        needed_for=f"config.hash_seed={config.hash_seed} (HF transformers' LSH rotations come from torch's random "
                   f"generator)",
        instead="use a config with hash_seed=None (config.replace(hash_seed=None)) to hash with reformer-core's own "
                "seeded rotations")
    # Widened to float64 by the adapter and cast back here: exact, and any backend takes the numbers.
    rotations = backend_for(like).from_numpy(drawn, dtype=like.dtype)
    return [rotations if kind == "lsh" else None for kind in config.attention_layers]
