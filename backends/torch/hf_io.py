"""What HF interoperability needs from torch itself: reading ``pytorch_model.bin`` without
unpickling objects, and torch's CPU generator for HF's ``hash_seed`` rotations. The core
reaches these through ``TorchBackend`` (``backends/_base.py`` declares them), never by
importing torch."""

from __future__ import annotations

import pickle

import numpy as np

__all__ = ["read_state_dict", "hash_seed_normal"]


def read_state_dict(path) -> tuple[dict, dict]:
    """``(arrays, dtypes)`` of a torch state-dict file, loaded with ``weights_only=True``:
    NumPy arrays, bfloat16 entries widened to float32 (exact), the rest as
    stored; ``dtypes`` names each entry's stored dtype."""
    import torch  # at call time: ImportError here is what the core reports as "install torch"

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} is not a plain tensor state dict: torch.load(weights_only=True) refused it, "
                         f"so it holds other pickled objects (never unpickled here): {str(error).splitlines()[0]}") \
            from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{path} cannot be read as a torch state dict: {error}") from None
    if not isinstance(state, dict):
        raise TypeError(f"{path} holds a {type(state).__name__}, not a state dict (a dict of tensors)")
    arrays, dtypes = {}, {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; a state dict maps "
                            f"names to tensors")
        value = value.detach()
        dtypes[key] = str(value.dtype).rsplit(".", 1)[-1]
        arrays[key] = (value.to(torch.float32) if value.dtype == torch.bfloat16 else value).numpy()
    return arrays, dtypes


def hash_seed_normal(shape: tuple, seed: int, dtype_name: str) -> np.ndarray:
    """``torch.randn(shape)`` from a CPU generator seeded with ``seed``, drawn in ``dtype_name``
    (draws differ per dtype), returned widened to float64 (exact)."""
    import torch

    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    drawn = torch.randn(shape, generator=generator, dtype=getattr(torch, dtype_name))
    return drawn.to(torch.float64).numpy()
