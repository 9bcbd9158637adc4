"""Native fast paths: validate once in the core, then delegate to a backend's fused kernel.

A backend that declares ``native_lsh_attention`` gets the step after hashing and sorting
(sorted-chunk attention with its masks, the per-round log-sum-exp and the round combination)
through ``Backend.lsh_chunk_attention``; every other backend, and every call inside
:func:`standard_path`, runs the standard Array-API code, the reference the kernels are tested
against. Hashing, sorting, validation and the hand-written VJPs (``lsh_attention_vjp``) are
always the core's. The hand-written VJP of LSH attention (NumPy, array-api-strict and CuPy
training; any backend calling ``lsh_attention_vjp``) runs the core's memory-lean recompute
path, ``lean.py``: blocks of chunks gathered by index, probabilities recomputed block by block
in the pullback, O(length) memory; inside :func:`standard_path` it runs the standard code,
which keeps every chunk's windows and probabilities for the pullback.

A backend that declares ``native_layer_ops`` also gets the position-wise layers' hot
operations (``dense``, ``relu``, ``layer_norm`` in ``_model/layers.py``) through its fused
framework ops (``Backend.native_dense`` ...): on torch, one ``linear`` instead of a matmul and a
broadcast add, ``relu`` instead of a ``where`` against a 0-d zero (13x slower on the CPU), one
``layer_norm`` instead of eight elementwise passes. :func:`standard_path` turns them off too.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

__all__ = ["standard_path", "native_lsh_backend", "native_layer_backend", "uses_standard_path"]

# REFORMER_STANDARD_PATH=1 forces the standard path for the whole process (read at import).
_standard = os.environ.get("REFORMER_STANDARD_PATH", "") not in ("", "0")


@contextlib.contextmanager
def standard_path(enabled: bool = True) -> Iterator[None]:
    """Run the standard Array-API path instead of native kernels inside the block.

    ``with reformer_core.standard_path(): ...`` is for debugging a kernel and for comparing
    it with the reference; ``standard_path(False)`` re-enables kernels in an inner block. The
    switch is process-wide (not per thread); ``REFORMER_STANDARD_PATH=1`` sets it at import.
    Under ``torch.compile`` or ``jax.jit`` it is read when the function is traced.
    """
    global _standard
    if not isinstance(enabled, bool):
        raise TypeError(f"standard_path(enabled) takes a bool, got {enabled!r}")
    previous, _standard = _standard, enabled
    try:
        yield
    finally:
        _standard = previous


def uses_standard_path() -> bool:
    """Whether native kernels are switched off now."""
    return _standard


def native_lsh_backend(array: Any):
    """The adapter class of ``array``'s framework when it has a native LSH kernel and kernels
    are on, else None.

    Looked up from the array's type alone (no backend object, no context variable), so that
    ``torch.compile`` traces through it without a graph break; the kernels are static methods
    that take their device from their inputs.
    """
    if _standard:
        return None
    from .._registry import adapter_class_of

    cls = adapter_class_of(array)
    return cls if cls is not None and cls.native_lsh_attention else None


def native_layer_backend(array: Any):
    """The adapter class of ``array``'s framework when it declares ``native_layer_ops`` and
    kernels are on, else None (looked up like :func:`native_lsh_backend`)."""
    if _standard:
        return None
    from .._registry import adapter_class_of

    cls = adapter_class_of(array)
    return cls if cls is not None and cls.native_layer_ops else None
