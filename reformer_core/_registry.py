"""Choosing a backend: process default, scoped override, environment variable, or the inputs.

Resolution order for :func:`get_backend`: the innermost :func:`use_backend` block, then
:func:`set_backend`, then ``$REFORMER_BACKEND``, then NumPy. The registry is the list of
adapter classes in ``reformer_core.backends.ADAPTERS``; each declares its name, framework,
array modules and extra once. Adapter modules import no framework, and an adapter is only
instantiated (and its framework imported) when first used, so ``import reformer_core``
imports no framework.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
from typing import Any, Iterator

__all__ = [
    "set_backend",
    "use_backend",
    "get_backend",
    "available_backends",
    "known_backends",
    "backend_for",
    "resolve_backend",
    "adapter_class",
    "adapter_class_of",
    "framework_of",
    "install_hint",
    "adapter_class_from_spec",
]

_default = None  # set by set_backend
_instances: dict = {}  # (name, device spec) -> backend; adapters hold no mutable state
_scoped: contextvars.ContextVar = contextvars.ContextVar("reformer_core_backend", default=None)


@functools.lru_cache(maxsize=1)
def _adapters() -> dict[str, type]:
    from .backends import ADAPTERS

    return {cls.name: cls for cls in ADAPTERS}


@functools.lru_cache(maxsize=1)
def _by_array_module() -> dict[str, str]:
    return {module: cls.name for cls in _adapters().values() for module in cls.array_modules}


def known_backends() -> tuple[str, ...]:
    """Every backend name reformer_core knows, installed or not."""
    return tuple(_adapters())


def adapter_class(name: str) -> type:
    """The adapter class registered as ``name`` (ValueError listing the known names)."""
    try:
        return _adapters()[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(_adapters())}") from None


def framework_call(name: str, method: str, *args: Any, needed_for: str, instead: str) -> Any:
    """``adapter_class(name).method(*args)``: how the core reaches a framework-only feature
    (the core never imports a framework). When the framework is missing, ImportError saying
    what ``needed_for`` it, how to install it, and what to do ``instead``."""
    cls = adapter_class(name)
    try:
        return getattr(cls, method)(*args)
    except ImportError:
        raise ImportError(f"{needed_for} needs {cls.framework}: install {cls.framework} ({install_hint(name)}), "
                          f"or {instead}") from None


def install_hint(name: str) -> str:
    """The command that installs backend ``name``'s framework."""
    cls = adapter_class(name)
    return f"pip install 'reformer-core[{cls.extra}]'" if cls.extra else f"pip install {cls.framework}"


def _installed(cls: type) -> bool:
    return importlib.util.find_spec(cls.framework) is not None  # finds, does not import


def available_backends() -> tuple[str, ...]:
    """Backends whose framework is installed (checked without importing it)."""
    return tuple(name for name, cls in _adapters().items() if _installed(cls))


def adapter_class_of(array: Any) -> type | None:
    """The registered adapter class for ``array``'s framework (None if none is registered),
    from its type alone: no backend object, no context variable, nothing a compiler's tracer
    would stop at."""
    kind = type(array)
    try:
        return _adapter_by_type[kind]
    except KeyError:
        found = _adapter_by_type[kind] = _adapters().get(framework_of(array))
        return found


# type -> adapter class: both lookups above depend on the type alone and are fixed for the
# process (_adapters is computed once), so a hot loop (a decode step asks per layer op) pays
# one dict lookup instead of a module-name split and two more.
_adapter_by_type: dict[type, type | None] = {}


def framework_of(array: Any) -> str | None:
    """Backend name of the framework that made ``array`` ('numpy', 'torch', 'strict', ...), or None.

    Looks only at the array's type, so it never imports a framework. Arrays of other
    libraries that implement the standard (``__array_namespace__``) are named by their
    top-level module, so third-party backends work too.
    """
    module = type(array).__module__.split(".", 1)[0]
    known = _by_array_module().get(module)
    if known is None and hasattr(type(array), "__array_namespace__"):
        return module
    return known


def _split_spec(spec: str) -> tuple[str, str | None]:
    name, sep, device = spec.partition(":")
    return name.strip().lower(), (device.strip() or None) if sep else None


def _make(name: Any, device: Any = None):
    from .backends import Backend

    if isinstance(name, Backend):  # a backend object (e.g. a third-party adapter)
        if device is not None:
            raise ValueError("give the device to the adapter's constructor, not alongside a backend object")
        return name
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a string such as 'numpy', got {name!r}")
    if ":" in name and name.partition(":")[0].strip().lower() not in _adapters():
        return _import_adapter(name, device)  # "package.module:ClassName"
    base, spec_device = _split_spec(name)
    if spec_device is not None and device is not None:
        raise ValueError(f"backend {name!r} already names a device; do not also pass device={device!r}")
    device = spec_device if device is None else device
    cls = adapter_class(base)
    if not _installed(cls):
        raise ValueError(f"backend {base!r} needs {cls.framework}, which is not installed; run {install_hint(base)}")
    key = (base, None if device is None else str(device))
    cached = _instances.get(key)
    if cached is None:
        cached = _instances[key] = cls(device)
    return cached


_SPEC_FORM = "'package.module:ClassName' (optionally 'package.module:ClassName:device')"


def adapter_class_from_spec(spec: str) -> type:
    """The third-party adapter class a ``"package.module:ClassName[:device]"`` spec names.

    Importing ``package.module`` is the only side effect (it runs the module's top-level
    code, as any import does); the attribute is then checked to be a subclass of
    ``reformer_core.backends.Backend`` and nothing is called. Anything else (a function
    such as ``os:system``, an instance, a class of another kind) is refused with
    ``TypeError`` before it could run; an unimportable module or missing attribute raises
    ``ValueError``. Both name the spec and the valid form.
    """
    from .backends import Backend

    module_name, _, rest = spec.partition(":")
    class_name, _, _device = rest.partition(":")
    module_name, class_name = module_name.strip(), class_name.strip()
    if not module_name or not class_name or not class_name.isidentifier():
        raise ValueError(
            f"backend spec {spec!r} is neither a registered name ({', '.join(_adapters())}) nor a "
            f"third-party adapter's {_SPEC_FORM}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot load adapter {spec!r}: {error}; give it as {_SPEC_FORM}") from None
    try:
        cls = getattr(module, class_name)
    except AttributeError:
        raise ValueError(f"cannot load adapter {spec!r}: module {module_name!r} has no attribute "
                         f"{class_name!r}; give it as {_SPEC_FORM}") from None
    # Checked before anything is called: a spec may name only a Backend subclass.
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(
            f"backend spec {spec!r} names {module_name}.{class_name}, a {type(cls).__name__}, which is not a "
            f"subclass of reformer_core.backends.Backend; it was not called. A spec must name an adapter "
            f"class: {_SPEC_FORM}, with ClassName a subclass of reformer_core.backends.Backend"
        )
    return cls


def _import_adapter(spec: str, device: Any):
    """A third-party adapter named ``"package.module:ClassName"`` (optionally ``"...:ClassName:device"``)."""
    cls = adapter_class_from_spec(spec)
    spec_device = spec.partition(":")[2].partition(":")[2].strip()
    if spec_device and device is not None:
        raise ValueError(f"backend {spec!r} already names a device; do not also pass device={device!r}")
    return cls(device if device is not None else (spec_device or None))


def set_backend(name: Any, device: Any = None):
    """Make ``name`` the process-wide default backend.

    ``name`` is a registered name (``"numpy"``), optionally with a device (``"torch:cuda"``),
    a third-party adapter's import path (``"package.module:ClassName"``), or a backend object;
    None clears the default, so ``$REFORMER_BACKEND`` (or NumPy) applies again. An import
    path must name a subclass of ``reformer_core.backends.Backend``: its module is imported
    (the one side effect), anything else there is refused before it is called
    (:func:`adapter_class_from_spec`).

    Returns the backend object (None when cleared). ``use_backend`` blocks still take
    precedence inside them.
    """
    global _default
    if name is None:
        if device is not None:
            raise ValueError("set_backend(None) clears the default; it takes no device")
        _default = None
        return None
    _default = _make(name, device)
    return _default


@contextlib.contextmanager
def use_backend(name: Any, device: Any = None) -> Iterator[Any]:
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
    if framework not in _adapters():
        raise TypeError(
            f"no registered backend owns arrays of {framework!r}; select its adapter with "
            f"reformer_core.use_backend(adapter) or set_backend('package.module:AdapterClass')"
        )
    return _make(framework, device)


def resolve_backend(backend: Any = None):
    """A backend object from None (``get_backend()``), a name/``"name:device"``, or a backend."""
    from .backends import Backend

    if backend is None:
        return get_backend()
    if isinstance(backend, str):
        return _make(backend)
    if not isinstance(backend, Backend):
        raise TypeError(
            f"backend must be a name such as 'numpy' or 'strict:device1', or a backend object "
            f"(reformer_core.get_backend()); got {type(backend).__name__} {backend!r}"
        )
    return backend
