"""The small protocol every backend adapter implements.

An adapter is a class whose instances pair one framework with one device. The core only
asks an adapter to make arrays from NumPy (parameters and rotations are drawn on the host
so every backend starts from the same numbers), to bring them back, to name dtypes, and,
for training, to differentiate. Each adapter file has the same shape; differences between
frameworks are commented where they occur.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["Backend", "DTYPE_NAMES"]

DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


class Backend:
    """One framework on one device.

    Attributes:
        name: registry name (``"numpy"``, ``"torch"``, ...).
        framework: top-level module of the framework's arrays.
        extra: the ``pip install reformer-core[extra]`` that brings the framework in.
        capabilities: feature flags, e.g. ``{"float64", "autodiff", "gpu"}``.
    """

    name: str = ""
    framework: str = ""
    extra: str | None = None
    capabilities: frozenset[str] = frozenset()
    autodiff: bool = False  # True where vjp comes from the framework, not the hand-written rules

    def __init__(self, device: Any = None) -> None:
        self.device = self.default_device() if device is None else self.parse_device(device)

    # ---- namespace and devices ----
    @property
    def xp(self):
        """The Array API namespace (array-api-compat wrapped where needed)."""
        raise NotImplementedError

    def devices(self) -> list:
        """Devices this framework can place arrays on."""
        raise NotImplementedError

    def default_device(self):
        return self.devices()[0]

    def parse_device(self, device: Any):
        """Turn a user's device spec (object or string) into this framework's device."""
        for candidate in self.devices():
            if device == candidate or str(device) == str(candidate):
                return candidate
        raise ValueError(
            f"backend {self.name!r} has no device {device!r}; available: {[str(d) for d in self.devices()]}"
        )

    def owns(self, array: Any) -> bool:
        """Whether ``array`` is an array of this framework (never imports anything)."""
        return type(array).__module__.split(".", 1)[0] == self.framework

    # ---- dtypes and placement ----
    def dtype(self, name: str | Any):
        """The framework's dtype for ``"float32"`` etc.; dtype objects pass through."""
        if not isinstance(name, str):
            return name
        if name not in DTYPE_NAMES and name not in ("int32", "int64", "bool"):
            raise ValueError(f"unknown dtype name {name!r}; use one of {DTYPE_NAMES}")
        if not hasattr(self.xp, name):
            raise TypeError(f"backend {self.name!r} has no dtype {name!r}")
        return getattr(self.xp, name)

    def from_numpy(self, array: np.ndarray, *, dtype: str | Any | None = None):
        """Copy a host NumPy array onto this backend's device (optionally casting)."""
        raise NotImplementedError

    def to_numpy(self, array: Any) -> np.ndarray:
        """Copy an array of this backend to a host NumPy array."""
        raise NotImplementedError

    def synchronize(self, *arrays) -> None:
        """Wait for queued device work, or at least until ``arrays`` (pytrees of the call's
        results) are computed (no-op on synchronous frameworks). Timings must call it with the
        result: an asynchronous framework (JAX) would otherwise time only the dispatch."""

    # ---- differentiation ----
    def vjp(self, fn: Callable, *primals: Any):
        """``(fn(*primals), pullback)`` with ``pullback(cotangent) -> grads of primals``.

        The default uses reformer_core's hand-written rules (``fn`` must be a
        ``reformer_core.autodiff.Differentiable``); frameworks with autodiff override it.
        """
        from reformer_core.autodiff import rule_vjp

        return rule_vjp(fn, *primals)

    def jit(self, fn: Callable) -> Callable:
        """``fn`` compiled by the framework; only where ``"jit"`` is in ``capabilities``.

        ``fn`` must be a pure function of arrays and pytrees (dicts, lists, tuples) of arrays.
        """
        raise NotImplementedError(f"backend {self.name!r} cannot compile functions (no 'jit' capability)")

    #: Whether ``jit`` can compile a function that calls ``vjp`` (JAX: yes). When False
    #: (torch.compile cannot trace ``torch.autograd.grad``), compile the forward and let the
    #: framework differentiate the compiled function.
    jit_traces_vjp = True

    #: Whether ``native_full_attention`` runs without an ``L x L`` array (flash-style), so the
    #: benchmarks need not budget for one.
    native_attention_linear_memory = False

    def native_full_attention(self, q: Any, k: Any, v: Any, *, causal: bool) -> Any:
        """The framework's own fused full attention on ``(batch, heads, length, head_dim)``
        (scale ``1/sqrt(head_dim)``): a speed baseline for the benchmarks, not the core's
        semantics (no shared-QK key normalisation, no self mask). Only where
        ``"native-attention"`` is in ``capabilities``."""
        raise NotImplementedError(f"backend {self.name!r} has no native attention kernel")

    # ---- misc ----
    def version(self) -> str:
        raise NotImplementedError

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "version": self.version(),
            "device": str(self.device),
            "devices": [str(d) for d in self.devices()],
            "capabilities": sorted(self.capabilities),
        }

    def __repr__(self) -> str:
        return f"<reformer_core backend {self.name} on {self.device}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Backend) and (self.name, str(self.device)) == (other.name, str(other.device))

    def __hash__(self) -> int:
        return hash((self.name, str(self.device)))
