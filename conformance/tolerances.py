"""The one table of tolerances: how close each backend must come to the float64 NumPy oracle.

Errors are measured against the oracle evaluated on the *same* inputs, rounded to the
tested dtype, so input rounding is not counted. ``rtol`` is relative to the largest
magnitude of the expected array (element-wise relative error is meaningless near zero);
``atol`` is absolute. A quantity passes when ``max|actual - expected| <= atol + rtol *
max|expected|``.

Lookup order: (dtype, backend, device kind), then (dtype, backend, "*"), then
(dtype, "*", device kind), then (dtype, "*", "*"). Device kinds are "cpu" and "gpu".
Widen an entry only with a measured reason, written beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Tolerance", "TOLERANCES", "COMPONENT_FACTORS", "HASH_TIE_ULPS", "tolerance_for", "device_kind"]


@dataclass(frozen=True)
class Tolerance:
    forward_rtol: float
    forward_atol: float
    grad_rtol: float
    grad_atol: float

    def bound(self, quantity: str, scale: float) -> float:
        """The allowed max absolute error for a forward (``"forward"``) or gradient quantity."""
        if quantity == "forward":
            return self.forward_atol + self.forward_rtol * scale
        return self.grad_atol + self.grad_rtol * scale


TOLERANCES: dict[tuple[str, str, str], Tolerance] = {
    # float64: only summation order differs from the oracle.
    ("float64", "*", "*"): Tolerance(1e-10, 1e-12, 1e-9, 1e-11),
    # float32 on CPU: a few ulps per reduction; softmax over long windows and the backward's
    # products of several such terms accumulate to ~1e-6 relative.
    ("float32", "*", "cpu"): Tolerance(2e-5, 1e-6, 1e-4, 1e-6),
    # float32 on GPU (TF32 off): other reduction orders and fused kernels.
    ("float32", "*", "gpu"): Tolerance(1e-4, 1e-5, 5e-4, 1e-5),
    # bfloat16 keeps 8 bits of mantissa (eps 7.8e-3); attention sums a window of terms.
    # Gradients: measured up to 0.18 of max|grad| on jax full attention with head_dim 2, where
    # the key normalisation's rsqrt of a two-term mean amplifies bf16 rounding.
    ("bfloat16", "*", "*"): Tolerance(5e-2, 1e-2, 2.5e-1, 1e-2),
    # float16: 11 bits (eps 9.8e-4).
    ("float16", "*", "*"): Tolerance(1e-2, 1e-3, 3e-2, 1e-3),
}

# Composite components chain several blocks, each adding its rounding, and the backward
# multiplies by Jacobians that amplify it; their bounds are the table's times this factor
# (measured: float32 relative errors of the 1-3 layer models reach ~3e-5 forward).
COMPONENT_FACTORS = {"reversible": 10.0, "model": 10.0}

# Two backends may round x @ R differently and pick another bucket when the top two of
# [xR, -xR] are this close, relative to |x| * |R_col| (in units of the dtype's epsilon).
HASH_TIE_ULPS = 64


def device_kind(device) -> str:
    text = str(device).lower()
    return "gpu" if any(word in text for word in ("cuda", "gpu", "rocm", "mps")) else "cpu"


def tolerance_for(dtype: str, backend: str, device, component: str = "") -> Tolerance:
    kind = device_kind(device)
    factor = COMPONENT_FACTORS.get(component, 1.0) if dtype != "float64" else 1.0
    for key in ((dtype, backend, kind), (dtype, backend, "*"), (dtype, "*", kind), (dtype, "*", "*")):
        if key in TOLERANCES:
            t = TOLERANCES[key]
            return Tolerance(t.forward_rtol * factor, t.forward_atol * factor, t.grad_rtol * factor,
                             t.grad_atol * factor)
    raise KeyError(f"no tolerance for dtype {dtype!r} on backend {backend!r} ({kind}); add one to TOLERANCES")
