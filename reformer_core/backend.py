"""Choosing a backend: process default, scoped override, environment variable, or the inputs.

Resolution order for :func:`get_backend`: the innermost :func:`use_backend` block, then
:func:`set_backend`, then ``$REFORMER_BACKEND``, then NumPy. Adapters are imported only when
first used, so ``import reformer_core`` imports no framework.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
from typing import Any, Iterator

from ._arrays import framework_of

__all__ = [
    "set_backend",
    "use_backend",
    "get_backend",
    "available_backends",
    "known_backends",
    "backend_for",
    "resolve_backend",
]

# name -> (adapter module, framework module to look for, pip extra)
_REGISTRY: dict[str, tuple[str, str, str | None]] = {
    "numpy": ("reformer_core.backends.numpy", "numpy", None),
    "strict": ("reformer_core.backends.strict", "array_api_strict", "test"),
    "torch": ("reformer_core.backends.torch", "torch", "torch"),
    "jax": ("reformer_core.backends.jax", "jax", "jax"),
    "cupy": ("reformer_core.backends.cupy", "cupy", "cupy"),
}
# framework_of() names -> registry names
_BY_FRAMEWORK = {"numpy": "numpy", "strict": "strict", "torch": "torch", "jax": "jax", "cupy": "cupy"}

_default = None  # set by set_backend
_instances: dict = {}  # (name, device spec) -> backend; adapters hold no mutable state
_scoped: contextvars.ContextVar = contextvars.ContextVar("reformer_core_backend", default=None)


def known_backends() -> tuple[str, ...]:
    """Every backend name reformer_core knows, installed or not."""
    return tuple(_REGISTRY)


def _adapter_importable(name: str) -> bool:
    module, _, _ = _REGISTRY[name]
    return importlib.util.find_spec(module) is not None


def available_backends() -> tuple[str, ...]:
    """Backends whose framework is installed (checked without importing it)."""
    return tuple(
        name
        for name, (_, framework, _) in _REGISTRY.items()
        if importlib.util.find_spec(framework) is not None and _adapter_importable(name)
    )


def _split_spec(spec: str) -> tuple[str, str | None]:
    name, sep, device = spec.partition(":")
    return name.strip().lower(), (device.strip() or None) if sep else None


def _make(name: Any, device: Any = None):
    if hasattr(name, "from_numpy") and hasattr(name, "xp"):  # a backend object (e.g. a third-party adapter)
        if device is not None:
            raise ValueError("give the device to the adapter's constructor, not alongside a backend object")
        return name
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a string such as 'numpy', got {name!r}")
    if ":" in name and name.partition(":")[0].strip().lower() not in _REGISTRY:
        return _import_adapter(name, device)  # "package.module:ClassName"
    base, spec_device = _split_spec(name)
    if spec_device is not None and device is not None:
        raise ValueError(f"backend {name!r} already names a device; do not also pass device={device!r}")
    device = spec_device if device is None else device
    if base not in _REGISTRY:
        raise ValueError(f"unknown backend {base!r}; known backends: {', '.join(_REGISTRY)}")
    module_name, framework, extra = _REGISTRY[base]
    if importlib.util.find_spec(framework) is None:
        hint = f"pip install 'reformer-core[{extra}]'" if extra else f"pip install {framework}"
        raise ValueError(f"backend {base!r} needs {framework}, which is not installed; run {hint}")
    if not _adapter_importable(base):
        raise ValueError(f"backend {base!r} has no adapter in this version of reformer-core")
    key = (base, None if device is None else str(device))
    cached = _instances.get(key)
    if cached is None:
        module = importlib.import_module(module_name)
        cached = _instances[key] = module.BACKEND(device)
    return cached


def _import_adapter(spec: str, device: Any):
    """A third-party adapter named ``"package.module:ClassName"`` (optionally ``"...:ClassName:device"``)."""
    module_name, _, rest = spec.partition(":")
    class_name, _, spec_device = rest.partition(":")
    if not class_name:
        raise ValueError(f"adapter {spec!r} must be given as 'package.module:ClassName'")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot load adapter {spec!r}: {error}") from None
    return cls(device if device is not None else (spec_device or None))


def set_backend(name: str, device: Any = None):
    """Make ``name`` the process-wide default backend.

    ``name`` is a registered name (``"numpy"``), optionally with a device (``"torch:cuda"``),
    a third-party adapter's import path (``"package.module:ClassName"``), or a backend object.

    Returns the backend object. ``use_backend`` blocks still take precedence inside them.
    """
    global _default
    _default = _make(name, device)
    return _default


@contextlib.contextmanager
def use_backend(name: str, device: Any = None) -> Iterator[Any]:
    """Use ``name`` inside a ``with`` block (per thread and per asyncio task)."""
    backend = _make(name, device)
    token = _scoped.set(backend)
    try:
        yield backend
    finally:
        _scoped.reset(token)


def get_backend():
    """The backend in force: ``use_backend`` > ``set_backend`` > ``$REFORMER_BACKEND`` > numpy."""
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    if _default is not None:
        return _default
    env = os.environ.get("REFORMER_BACKEND")
    if env:
        return _make(env)
    return _make("numpy")


def backend_for(*arrays: Any):
    """The backend that owns ``arrays``, on their device (TypeError when frameworks are mixed)."""
    from ._arrays import check_same_device, device_of, namespace

    present = [a for a in arrays if a is not None]
    namespace(*present)  # raises on mixing and on non-arrays
    check_same_device({f"arrays[{i}]": a for i, a in enumerate(present)})  # no silent pick of one device
    framework = framework_of(present[0])
    current = get_backend()
    device = device_of(present[0])
    if current.owns(present[0]) and str(current.device) == str(device):
        return current
    if framework not in _BY_FRAMEWORK:
        raise TypeError(
            f"no registered backend owns arrays of {framework!r}; select its adapter with "
            f"reformer_core.use_backend(adapter) or set_backend('package.module:AdapterClass')"
        )
    return _make(_BY_FRAMEWORK[framework], device)


def resolve_backend(backend: Any = None):
    """A backend object from None (``get_backend()``), a name/``"name:device"``, or a backend."""
    if backend is None:
        return get_backend()
    if isinstance(backend, str):
        return _make(backend)
    if not hasattr(backend, "from_numpy"):
        raise TypeError(
            f"backend must be a name such as 'numpy' or 'strict:device1', or a backend object "
            f"(reformer_core.get_backend()); got {type(backend).__name__} {backend!r}"
        )
    return backend
