"""Comparing a backend's result with the oracle, and saying how to reproduce a failure.

Every comparison checks the namespace (the array belongs to the backend under test), the
device, the dtype and the shape before the values, records its errors (for
``reformer-core check``), and on failure raises an AssertionError that ends with a
paste-able reproduction.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from reformer_core._arrays import device_of, framework_of

from .tolerances import tolerance_for

__all__ = ["RESULTS_ENV", "compare", "reproduction", "record"]

RESULTS_ENV = "REFORMER_CONFORMANCE_RESULTS"  # a file to append one JSON line per comparison to


def reproduction(component: str, target, dtype: str, case) -> str:
    return (
        "reproduce with:\n"
        "  python -c \"from reformer_core.conformance import reproduce; "
        "from reformer_core.conformance.strategies import *; "
        f"reproduce({component!r}, {target.spec!r}, {dtype!r}, {case!r})\""
    )


def record(**row: Any) -> None:
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def _dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def compare(actual: Any, expected: np.ndarray, *, target, dtype: str, component: str, quantity: str,
            case, kind: str = "forward", exact: bool = False, result_dtype: str | None = None) -> None:
    """Assert that ``actual`` (an array of the target backend) matches ``expected`` (float64).

    ``kind`` is ``"forward"`` or ``"grad"`` (picks the tolerance); ``exact`` demands equality
    (integer results such as buckets and permutations). ``dtype`` is the dtype under test (it
    picks the tolerance); ``result_dtype`` is the dtype ``actual`` must have when that differs
    (a loss is float32 even when computed from bfloat16 logits).
    """
    backend = target.backend
    where = f"{component} / {quantity} on {target.spec} ({dtype})"

    def fail(problem: str) -> None:
        raise AssertionError(f"{where}: {problem}\n{reproduction(component, target, dtype, case)}")

    if not backend.owns(actual):
        fail(f"result is a {type(actual).__module__}.{type(actual).__name__} (framework {framework_of(actual)!r}), "
             f"not an array of backend {backend.name!r}")
    if str(device_of(actual)) != str(backend.device):
        fail(f"result is on device {device_of(actual)}, expected {backend.device}")
    expected = np.asarray(expected)
    if tuple(actual.shape) != expected.shape:
        fail(f"shape {tuple(actual.shape)}, expected {expected.shape}")
    got_dtype = _dtype_name(actual.dtype)
    if not exact and got_dtype != (result_dtype or dtype):
        fail(f"dtype {got_dtype}, expected {result_dtype or dtype}")
    host = np.asarray(backend.to_numpy(actual))
    if exact:
        mismatches = int(np.sum(host != expected))
        record(backend=target.spec, device=str(backend.device), dtype=dtype, component=component,
               quantity=quantity, kind=kind, max_abs=float(mismatches), max_rel=float(mismatches), bound=0.0,
               passed=mismatches == 0)
        if mismatches:
            index = tuple(int(i) for i in np.argwhere(host != expected)[0])
            fail(f"{mismatches} entries differ; first at {index}: got {host[index]}, expected {expected[index]}")
        return
    host = host.astype(np.float64)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    error = float(np.max(np.abs(host - expected))) if expected.size else 0.0
    finite = bool(np.all(np.isfinite(host)))
    bound = tolerance_for(dtype, backend.name, backend.device, component).bound(kind, scale)
    passed = finite and error <= bound
    record(backend=target.spec, device=str(backend.device), dtype=dtype, component=component, quantity=quantity,
           kind=kind, max_abs=error, max_rel=error / scale if scale else error, bound=bound, passed=passed)
    if not finite:
        fail("result holds NaN or inf")
    if not passed:
        index = np.unravel_index(int(np.argmax(np.abs(host - expected))), expected.shape)
        fail(f"max |error| {error:.3e} exceeds {bound:.3e} (= atol + rtol * max|expected| {scale:.3e}); "
             f"worst at {tuple(int(i) for i in index)}: got {host[index]!r}, expected {expected[index]!r}")
