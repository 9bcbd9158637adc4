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

from reformer_core._attention import lsh as lsh_module
from reformer_core._model import layers as layers_module

from .tolerances import HASH_TIE_ULPS

__all__ = ["EPSILON", "bucket_margins", "check_buckets", "replay_buckets", "record_buckets", "record_gates",
           "replay_gates", "RELU_TIE_ULPS", "capture_traced", "release_captured"]

# A ReLU pre-activation this close to 0 (in ulps of the dtype, relative to the largest
# |pre-activation| of its row) may land on the other side of 0 in a low-precision backend.
RELU_TIE_ULPS = 16

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

    from reformer_core._attention.hashing import compute_buckets

    oracle = np.asarray(compute_buckets(xp, x, rotations, num_buckets, keep))
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
    original = lsh_module.compute_buckets

    def recording(xp, x, rotations, num_buckets, keep):
        buckets = original(xp, x, rotations, num_buckets, keep)
        recorded.append(np.asarray(to_numpy(buckets)))
        return buckets

    with mock.patch.object(lsh_module, "compute_buckets", recording), _active("buckets", recorded):
        yield recorded


@contextlib.contextmanager
def replay_buckets(recorded: list[np.ndarray], dtype: str, failures: list[str]):
    """Make the oracle's LSH calls use the backend's recorded buckets, after checking that each
    differs from the oracle's own only by ties (real mismatches are appended to ``failures``)."""
    queue = list(recorded)
    original = lsh_module.compute_buckets

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

    with mock.patch.object(lsh_module, "compute_buckets", replaying):
        yield


# ReLU gates: the same tie problem as buckets. In bfloat16 a pre-activation within rounding of
# 0 can take the other side of the gate than in the float64 oracle, which moves that position's
# whole term in the gradient (measured: 0.46 relative on a feed-forward bias gradient). So the
# backend's gates are recorded, checked to differ from the oracle's only at near-zero
# pre-activations, and replayed in the oracle, as buckets are.


@contextlib.contextmanager
def record_gates(to_numpy):
    """Collect ``(pre-activation, gate)`` of every ReLU the backend computes."""
    recorded: list[tuple[np.ndarray, np.ndarray]] = []
    original = layers_module.activation

    def recording(xp, name, x):
        if name == "relu":
            recorded.append((np.asarray(to_numpy(x)).astype(np.float64), np.asarray(to_numpy(x > 0))))
        return original(xp, name, x)

    with mock.patch.object(layers_module, "activation", recording), _active("gates", recorded):
        yield recorded


@contextlib.contextmanager
def replay_gates(recorded: list, dtype: str, failures: list[str]):
    """Make the oracle's ReLUs use the backend's gates where the two differ by a tie (real
    differences are appended to ``failures``). Calls are matched by shape and nearest values,
    since a chunked feed-forward's backward calls them in another order than its forward."""
    original, original_backward = layers_module.activation, layers_module.activation_backward

    def gate_for(x):
        x = np.asarray(x)
        candidates = [(pre, gate) for pre, gate in recorded if pre.shape == x.shape]
        if not candidates:
            return None
        pre, gate = min(candidates, key=lambda c: float(np.max(np.abs(c[0] - x))) if x.size else 0.0)
        mine = x > 0
        differ = gate != mine
        if differ.any():
            scale = np.max(np.abs(x), axis=-1, keepdims=True)
            tie = np.abs(x) <= RELU_TIE_ULPS * EPSILON[dtype] * scale
            real = int(np.sum(differ & ~tie))
            if real:
                failures.append(f"{real} ReLU gates differ from the oracle's by more than a rounding tie")
        return gate

    def activation(xp, name, x):
        gate = gate_for(x) if name == "relu" else None
        if gate is None:
            return original(xp, name, x)
        return xp.where(xp.asarray(gate), x, xp.zeros_like(x))

    def activation_backward(xp, name, x, d_out):
        gate = gate_for(x) if name == "relu" else None
        if gate is None:
            return original_backward(xp, name, x, d_out)
        return xp.where(xp.asarray(gate), d_out, xp.zeros_like(d_out))

    with mock.patch.object(layers_module, "activation", activation), \
            mock.patch.object(layers_module, "activation_backward", activation_backward):
        yield


# Compiled (``+jit``) targets: traced values cannot be brought to the host in the middle of a
# function being compiled. ``capture_traced`` collects them (computed by the genuine functions)
# so the compiled function can return them; ``release_captured`` then hands the concrete
# values to the innermost active ``record_buckets`` / ``record_gates`` block.

_GENUINE = {"hash": lsh_module.compute_buckets, "activation": layers_module.activation}
_RECORDING: dict[str, list[list]] = {"buckets": [], "gates": []}  # active record_* lists, innermost last


@contextlib.contextmanager
def _active(kind: str, recorded: list):
    _RECORDING[kind].append(recorded)
    try:
        yield
    finally:
        _RECORDING[kind].remove(recorded)


@contextlib.contextmanager
def capture_traced(detach=lambda array: array):
    """Inside a function being traced: collect every LSH call's buckets and every ReLU's
    ``(pre-activation, gate)`` as traced arrays, in call order. ``detach`` cuts an array out
    of an inner autodiff trace (a ReLU inside ``vjp``), so it can be returned."""
    captured: dict[str, list] = {"buckets": [], "gates": []}

    def hashing(xp, x, rotations, num_buckets, keep):
        buckets = _GENUINE["hash"](xp, x, rotations, num_buckets, keep)
        captured["buckets"].append(buckets)
        return buckets

    def activation(xp, name, x):
        if name == "relu":
            captured["gates"].append((detach(x), x > 0))
        return _GENUINE["activation"](xp, name, x)

    with mock.patch.object(lsh_module, "compute_buckets", hashing), mock.patch.object(layers_module, "activation", activation):
        yield captured


def release_captured(captured: dict, to_numpy) -> None:
    """Give what a compiled function returned from ``capture_traced`` to the active recorders."""
    for buckets in captured["buckets"]:
        if _RECORDING["buckets"]:
            _RECORDING["buckets"][-1].append(np.asarray(to_numpy(buckets)))
    for pre, gate in captured["gates"]:
        if _RECORDING["gates"]:
            _RECORDING["gates"][-1].append((np.asarray(to_numpy(pre)).astype(np.float64), np.asarray(to_numpy(gate))))
