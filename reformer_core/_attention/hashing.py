"""Angular locality-sensitive hashing (Reformer section 2): random rotations and bucket ids."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .._arrays import check_rank, check_same_device, check_same_float_dtype, device_of, keep_mask, namespace
from .._config import rotation_size, total_buckets, validate_num_buckets

__all__ = ["random_rotations", "hash_vectors", "compute_buckets", "buckets_per_round", "check_rotations"]


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer, tuple, np.random.SeedSequence)):
        raise TypeError(f"seed must be an int (or a tuple of ints), got {type(seed).__name__}")
    if isinstance(seed, (int, np.integer)) and seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if isinstance(seed, tuple):
        for entry in seed:
            if isinstance(entry, bool) or not isinstance(entry, (int, np.integer)) or entry < 0:
                raise ValueError(f"seed tuple entries must be non-negative ints, got {seed!r}")


def random_rotations(
    seed: int | Sequence[int],
    num_heads: int,
    head_dim: int,
    num_hashes: int,
    num_buckets: int | tuple[int, ...],
    *,
    like: Any = None,
    backend: Any = None,
    dtype: Any = None,
):
    """Gaussian rotations for :func:`hash_vectors`, drawn on the host and moved to a backend.

    They are drawn in float64 with ``numpy.random.default_rng(seed)`` and then cast, so every
    backend and dtype hashes with the same rotations (up to rounding).

    Args:
        seed: an int or tuple of ints for ``numpy.random.default_rng``.
        num_heads: the rotation shape's first size.
        head_dim: its second size.
        num_hashes: its third size (hash rounds).
        num_buckets: an even int, or a tuple of even factors (factorised hashing).
        like: an array whose backend, device and dtype the rotations take.
        backend: a backend object or name such as ``"strict:device1"`` (default:
            ``get_backend()``) when ``like`` is not given.
        dtype: dtype name or object (default: ``like``'s dtype, else float32).

    Returns:
        array of shape ``(num_heads, head_dim, num_hashes, rotation_size // 2)`` where
        ``rotation_size`` is ``num_buckets`` or the sum of its factors.
    """
    from .._registry import backend_for, resolve_backend

    _check_seed(seed)
    validate_num_buckets(num_buckets)
    for name, value in (("num_heads", num_heads), ("head_dim", head_dim), ("num_hashes", num_hashes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if like is not None:
        if backend is not None:
            raise ValueError("give either like= or backend=, not both")
        backend = backend_for(like)
        dtype = like.dtype if dtype is None else dtype
    else:
        backend = resolve_backend(backend)
    rng = np.random.default_rng(seed)
    host = rng.standard_normal((num_heads, head_dim, num_hashes, rotation_size(num_buckets) // 2))
    return backend.from_numpy(host, dtype="float32" if dtype is None else dtype)


def buckets_per_round(num_buckets: int | tuple[int, ...], padded: bool) -> int:
    """Bucket ids one hashing round uses: the buckets, plus one for padding when masked."""
    return total_buckets(num_buckets) + (1 if padded else 0)


def hash_vectors(x: Any, rotations: Any, num_buckets: int | tuple[int, ...], *, attention_mask: Any = None):
    """Bucket ids of ``x`` for every hashing round, round offsets included.

    ``bucket = argmax([x R, -x R])`` per round; with factors ``(b1, b2, ...)``, factor k hashes
    the next ``b_k / 2`` columns to ``a_k`` and ``bucket = a1 + b1 a2 + b1 b2 a3 + ...``. Round r
    adds ``r * n`` where ``n`` is the number of buckets, plus one when ``attention_mask`` is
    given: padded positions then go to that extra bucket, which sorts last in each round.
    Hashing has no gradient; buckets do not change when ``x`` is scaled by a positive number.

    Args:
        x: ``(batch, heads, length, head_dim)`` floating.
        rotations: ``(heads, head_dim, num_hashes, rotation_size // 2)``, same dtype as ``x``.
        num_buckets: an even int or a tuple of even factors.
        attention_mask: optional ``(batch, length)`` bool/int, True/1 for real tokens.

    Returns:
        int64 array ``(batch, heads, num_hashes, length)``.
    """
    xp = namespace(x, rotations, attention_mask)
    validate_num_buckets(num_buckets)
    check_rank("x", x, 4, "(batch, heads, length, head_dim)")
    check_rotations(xp, x, rotations, num_buckets)
    check_same_device({"x": x, "attention_mask": attention_mask})
    return compute_buckets(xp, x, rotations, num_buckets, attention_mask)


def check_rotations(xp, x: Any, rotations: Any, num_buckets) -> None:
    """Raise unless ``rotations`` fit ``x (b, h, L, d)`` and ``num_buckets`` (dtype, device, shape)."""
    check_rank("rotations", rotations, 4, "(heads, head_dim, num_hashes, rotation_size // 2)")
    check_same_float_dtype(xp, {"x": x, "rotations": rotations})
    check_same_device({"x": x, "rotations": rotations})
    _, heads, _, head_dim = x.shape
    r_heads, r_dim, _, half = rotations.shape
    if (r_heads, r_dim) != (heads, head_dim) or 2 * half != rotation_size(num_buckets):
        raise ValueError(
            f"rotations of shape {tuple(rotations.shape)} do not fit x of shape {tuple(x.shape)} with "
            f"num_buckets={num_buckets!r}; expected ({heads}, {head_dim}, num_hashes, "
            f"{rotation_size(num_buckets) // 2}); draw them with random_rotations(...)"
        )


_CONCAT_BELOW = 1 << 14  # elements; below it the four reductions cost more dispatches than the copy saves


def _signed_argmax(xp, part):
    """``argmax(concat([part, -part], axis=-1), axis=-1)`` as int64, without the concatenation.

    The first maximum of ``[p, -p]`` is the first maximum of ``p`` when ``max(p) >= -min(p)``
    (ties go to the first half, as argmax's first occurrence does), else the first minimum of
    ``p`` in the second half. A NaN counts as the maximum, as argmax's NaN does (first half).
    Small arrays (a decode step's one position) take the concatenation: fewer operations,
    the same ids.
    """
    if math.prod(part.shape) <= _CONCAT_BELOW:
        return xp.astype(xp.argmax(xp.concat([part, -part], axis=-1), axis=-1), xp.int64)
    high = xp.argmax(part, axis=-1, keepdims=True)
    low = xp.argmin(part, axis=-1, keepdims=True)
    top = xp.take_along_axis(part, high, axis=-1)
    bottom = xp.take_along_axis(part, low, axis=-1)
    first_half = xp.logical_or(top >= -bottom, xp.isnan(top))
    ids = xp.where(first_half, high, low + part.shape[-1])
    return xp.astype(ids[..., 0], xp.int64)


def compute_buckets(xp, x, rotations, num_buckets, attention_mask):
    """:func:`hash_vectors` without validation (``attention_mask`` may be None)."""
    batch, heads, length, _ = x.shape
    _, head_dim, num_hashes, half = rotations.shape
    flat = xp.reshape(rotations, (heads, head_dim, num_hashes * half))
    rotated = xp.matmul(x, flat)  # (b, h, L, n * half)
    rotated = xp.reshape(rotated, (batch, heads, length, num_hashes, half))
    factors = num_buckets if isinstance(num_buckets, tuple) else (num_buckets,)
    buckets = None
    start, stride = 0, 1
    for factor in factors:
        ids = _signed_argmax(xp, rotated[..., start : start + factor // 2])
        buckets = ids if buckets is None else buckets + stride * ids
        start += factor // 2
        stride *= factor
    buckets = xp.permute_dims(buckets, (0, 1, 3, 2))  # (b, h, n, L)
    per_round = buckets_per_round(num_buckets, attention_mask is not None)
    if attention_mask is not None:
        keep = keep_mask(xp, attention_mask, batch, length)
        pad_bucket = xp.asarray(per_round - 1, dtype=xp.int64, device=device_of(x))
        buckets = xp.where(keep[:, None, None, :], buckets, pad_bucket)
    offsets = xp.arange(num_hashes, dtype=xp.int64, device=device_of(x)) * per_round
    return buckets + offsets[:, None]
