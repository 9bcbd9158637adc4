"""The float64 NumPy oracle's helpers: rounding, hash margins, and bucket replay.

Bucket ties: two backends may round ``x @ R`` differently and so pick another bucket when
the top two entries of ``[xR, -xR]`` are nearly equal. The suite never lets that hide a
real mismatch: wherever the backend's buckets differ from the oracle's, the oracle's
margin (top-1 minus top-2, in float64) must be within a few ulps of the dtype relative to
``|x| * |R_col|``; any other difference fails. Past that check, the oracle recomputes with
the backend's buckets, so the rest of the comparison is exact in its logic.
"""

from __future__ import annotations

import contextlib
from typing import Any
from unittest import mock

import numpy as np

from reformer_core import lsh as lsh_module

from .tolerances import HASH_TIE_ULPS

__all__ = ["EPSILON", "bucket_margins", "check_buckets", "replay_buckets", "record_buckets"]

EPSILON = {"float64": 2.0**-52, "float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}


def bucket_margins(x: np.ndarray, rotations: np.ndarray, num_buckets) -> tuple[np.ndarray, np.ndarray]:
    """Per (batch, head, round, position): the smallest top-1 minus top-2 gap of
    ``[xR_k, -xR_k]`` over factors k, and the scale ``|x| * max_col |R|`` it is judged against."""
    rotated = np.einsum("bhld,hdnr->bhnlr", x, rotations)
    factors = num_buckets if isinstance(num_buckets, tuple) else (num_buckets,)
    margins, start = None, 0
    for factor in factors:
        part = rotated[..., start : start + factor // 2]
        both = np.sort(np.concatenate([part, -part], axis=-1), axis=-1)
        gap = both[..., -1] - both[..., -2]
        margins = gap if margins is None else np.minimum(margins, gap)
        start += factor // 2
    x_norm = np.linalg.norm(x, axis=-1)[:, :, None, :]
    r_norm = np.linalg.norm(rotations, axis=1).max(axis=-1)[None, :, :, None]
    return margins, x_norm * r_norm


def check_buckets(got: np.ndarray, x: np.ndarray, rotations: np.ndarray, num_buckets, keep, dtype: str):
    """Compare a backend's buckets with the oracle's: ``(expected, real_mismatches)``.

    ``expected`` is the oracle's buckets with ties resolved the backend's way;
    ``real_mismatches`` counts differences that are not ties.
    """
    from array_api_compat import numpy as xp

    from reformer_core.hashing import _hash

    oracle = np.asarray(_hash(xp, x, rotations, num_buckets, keep))
    differ = got != oracle
    if not differ.any():
        return oracle, 0
    margins, scale = bucket_margins(x, rotations, num_buckets)
    tie = margins <= HASH_TIE_ULPS * EPSILON[dtype] * scale
    if keep is not None:
        tie = tie & np.broadcast_to(keep[:, None, None, :], tie.shape)
    expected = np.where(differ & tie, got, oracle)
    return expected, int(np.sum(differ & ~tie))


@contextlib.contextmanager
def record_buckets(to_numpy):
    """Collect, in call order, the buckets every LSH attention call computes."""
    recorded: list[np.ndarray] = []
    original = lsh_module._hash

    def recording(xp, x, rotations, num_buckets, keep):
        buckets = original(xp, x, rotations, num_buckets, keep)
        recorded.append(np.asarray(to_numpy(buckets)))
        return buckets

    with mock.patch.object(lsh_module, "_hash", recording):
        yield recorded


@contextlib.contextmanager
def replay_buckets(recorded: list[np.ndarray], dtype: str, failures: list[str]):
    """Make the oracle's LSH calls use the backend's recorded buckets, after checking that each
    differs from the oracle's own only by ties (real mismatches are appended to ``failures``)."""
    queue = list(recorded)
    original = lsh_module._hash

    def replaying(xp: Any, x, rotations, num_buckets, keep):
        if not queue:
            failures.append("the oracle made more LSH calls than the backend did")
            return original(xp, x, rotations, num_buckets, keep)
        got = queue.pop(0)
        expected, real = check_buckets(got, np.asarray(x), np.asarray(rotations), num_buckets,
                                       None if keep is None else np.asarray(keep), dtype)
        if real:
            failures.append(f"{real} bucket ids differ from the oracle's by more than a rounding tie")
        return expected

    with mock.patch.object(lsh_module, "_hash", replaying):
        yield
