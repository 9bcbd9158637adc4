"""The small protocol every backend adapter implements.

An adapter is a class whose instances pair one framework with one device. The core only
asks an adapter to make arrays from NumPy (parameters and rotations are drawn on the host
so every backend starts from the same numbers), to bring them back, to name dtypes, and,
for training, to differentiate. Every method a caller may use is declared here, with a
default: the required ones raise ``NotImplementedError``, the optional ones either raise it
with the reason (so a caller can report "not supported on this backend") or return a
documented neutral value. Callers never probe an adapter with ``getattr``.

An adapter module must import no framework at module level: the registry imports every
adapter class to read its declarations (``name``, ``framework``, ``array_modules``,
``extra``), and ``import reformer_core`` must stay framework-free.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["Backend", "DTYPE_NAMES"]

DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


class Backend:
    """One framework on one device.

    Declarations (class attributes, written once per adapter):
        name: registry name (``"numpy"``, ``"torch"``, ...).
        framework: the module that must be installed for the backend to work (looked up with
            ``importlib.util.find_spec``, never imported to check).
        array_modules: top-level modules of the framework's array types (``("jax", "jaxlib")``),
            so an array's backend is found from its type without importing anything.
        extra: the ``pip install reformer-core[extra]`` that brings the framework in (None: a
            dependency of reformer-core itself).
        autodiff: True where ``vjp`` comes from the framework, not the hand-written rules.
        jit_traces_vjp: whether ``jit`` can compile a function that calls ``vjp`` (JAX: yes;
            torch.compile cannot trace ``torch.autograd.grad``).
        native_attention_linear_memory: whether ``native_full_attention`` runs without an
            ``L x L`` array (flash-style), so the benchmarks need not budget for one.
        native_lsh_attention: whether ``lsh_chunk_attention`` is implemented; the core then
            runs it by default for LSH attention (``reformer_core.standard_path()`` turns it off).
        native_layer_ops: whether ``native_dense``, ``native_relu`` and ``native_layer_norm``
            are implemented; the core's position-wise layers then call them by default.

    ``capabilities`` is a property: feature flags such as ``{"float64", "autodiff", "gpu",
    "jit", "native-attention", "tracemalloc"}`` for this device (some depend on the device or
    on a framework switch, like JAX's x64 mode).
    """

    name: str = ""
    framework: str = ""
    array_modules: tuple[str, ...] = ()
    extra: str | None = None
    autodiff: bool = False
    jit_traces_vjp: bool = True
    native_attention_linear_memory: bool = False
    native_lsh_attention: bool = False
    native_layer_ops: bool = False

    def __init__(self, device: Any = None) -> None:
        self.device = self.default_device() if device is None else self.parse_device(device)

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset()

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
        return type(array).__module__.split(".", 1)[0] in (self.array_modules or (self.framework,))

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

    # ---- differentiation and compilation ----
    def vjp(self, fn: Callable, *primals: Any):
        """``(fn(*primals), pullback)`` with ``pullback(cotangent) -> grads of primals``.

        The default uses reformer_core's hand-written rules (``fn`` must be a
        ``reformer_core.Differentiable``); frameworks with autodiff override it.
        """
        from reformer_core._model.autodiff import rule_vjp

        return rule_vjp(fn, *primals)

    def stop_gradient(self, array: Any) -> Any:
        """``array`` cut out of any autodiff trace. Default: ``array`` itself (a backend
        without autodiff traces nothing)."""
        return array

    def jit(self, fn: Callable) -> Callable:
        """``fn`` compiled by the framework; only where ``"jit"`` is in ``capabilities``.

        ``fn`` must be a pure function of arrays and pytrees (dicts, lists, tuples) of arrays.
        """
        raise NotImplementedError(f"backend {self.name!r} cannot compile functions (no 'jit' capability)")

    def native_full_attention(self, q: Any, k: Any, v: Any, *, causal: bool) -> Any:
        """The framework's own fused full attention on ``(batch, heads, length, head_dim)``
        (scale ``1/sqrt(head_dim)``): a speed baseline for the benchmarks, not the core's
        semantics (no shared-QK key normalisation, no self mask). Only where
        ``"native-attention"`` is in ``capabilities``."""
        raise NotImplementedError(f"backend {self.name!r} has no native attention kernel")

    @staticmethod
    def lsh_chunk_attention(qk: Any, v: Any, perm: Any, undo: Any, *, key_keep: Any, logit_bias: Any,
                            dropout_keep: Any, dropout_rate: float, chunk_length: int, num_chunks_before: int,
                            num_chunks_after: int, causal: bool) -> Any:
        """The native kernel for LSH attention after hashing and sorting: the core's
        ``lsh_with_buckets`` semantics from ``perm``/``undo`` (``sort_by_bucket``) on, returning
        the rounds combined, ``(batch, heads, length, head_dim)``, differentiable by the
        framework. Inputs are validated by the core. A static method: it takes the device from
        its inputs (so the core can call it on the adapter class, traceable by compilers). Only
        where ``native_lsh_attention``."""
        raise NotImplementedError("this backend has no native LSH attention kernel")

    # ---- fused position-wise ops (where ``native_layer_ops``; static, traceable like the LSH kernel) ----
    @staticmethod
    def native_dense(x: Any, weight: Any, bias: Any) -> Any:
        """``x @ weight + bias`` (``bias`` may be None) for inputs of one dtype; differentiable."""
        raise NotImplementedError("this backend has no native layer ops")

    @staticmethod
    def native_relu(x: Any) -> Any:
        """``relu``: 0 where ``x <= 0``, NaN kept, gradient 0 at ``x == 0``; differentiable."""
        raise NotImplementedError("this backend has no native layer ops")

    @staticmethod
    def native_layer_norm(x: Any, scale: Any, bias: Any, eps: float) -> Any:
        """The core's ``layer_norm`` over the last axis (biased variance, ``eps`` inside the
        square root) for inputs of one dtype; differentiable."""
        raise NotImplementedError("this backend has no native layer ops")

    def compiled_generate(self, params: Any, config: Any, prompt: Any, max_new_tokens: int, *, temperature: float,
                          top_k: int | None, top_p: float | None, eos_token_id: int | None, seed: int,
                          rotations_seed: int) -> Any:
        """``reformer_core.generate`` (without ``on_token``) as one compiled decode loop: the
        same result, or None (the default) when this backend has none, and the core runs its
        eager loop. ``reformer_core.generate`` calls it with arguments it has validated and
        ``max_new_tokens >= 1``. JAX implements it (``jax/generate.py``)."""
        return None

    # ---- HF interoperability (the torch adapter implements these; the core calls them by name) ----
    @staticmethod
    def read_torch_state_dict(path: Any) -> tuple[dict, dict]:
        """``(NumPy arrays, stored dtype names)`` of a ``pytorch_model.bin`` state dict, read
        without unpickling anything but tensors. Only the torch adapter."""
        raise NotImplementedError("only the torch backend reads torch state dicts")

    @staticmethod
    def hash_seed_normal(shape: tuple, seed: int, dtype_name: str) -> Any:
        """float64 NumPy draws of torch's seeded CPU ``randn`` in ``dtype_name`` (HF's
        ``hash_seed`` rotations). Only the torch adapter."""
        raise NotImplementedError("only the torch backend draws torch's random numbers")

    # ---- memory (for ``reformer-core bench``) ----
    def peak_device_memory(self, fn: Callable[[], Any]) -> int:
        """Peak device bytes allocated during ``fn()`` above what was allocated before, read
        from the framework's device allocator. Only on devices that have one."""
        raise NotImplementedError(f"backend {self.name!r} on {self.device} has no device allocator to read")

    def memory_in_use(self) -> int:
        """Device bytes the framework's allocator holds now. Only on devices that have one."""
        raise NotImplementedError(f"backend {self.name!r} on {self.device} has no device allocator to read")

    def training_step_memory(self, config: Any, *, batch: int, length: int, reversible: bool) -> dict:
        """Memory of one training step's forward and backward beyond the parameters and the
        gradients it returns: ``{"bytes": int or None, "method": how it was measured}``.
        ``reversible`` selects the reversible stack; False stores every layer's activations
        (plain autodiff, the baseline). Implemented in each backend folder's ``memory.py``."""
        raise NotImplementedError(f"bench --memory cannot measure backend {self.name!r} yet")

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
