"""Which backends the suite tests: one switch, ``--backends`` or ``$REFORMER_CONFORMANCE_BACKENDS``.

A target is a backend spec as ``reformer_core.set_backend`` takes it: ``numpy``, ``strict``,
``strict:device1``, ``torch``, ``torch:cuda``, ``jax``, ``jax:gpu``, ``cupy``, or a
third-party adapter's import path ``package.module:ClassName``.

A target named explicitly (``--backends``, ``$REFORMER_CONFORMANCE_BACKENDS``) that is not a
known backend, whose framework is not installed, or whose ``package.module:ClassName`` does not
load as a ``Backend`` subclass is an error (:func:`spec_errors`): ``reformer-core check`` exits
2 naming it and the install command, and the pytest run stops at collection, so a typo cannot
pass as "all skipped". A target that is installed but cannot run here (no GPU, no such device,
no jit) is skipped with the reason.

A ``+jit`` suffix (``jax+jit``, ``jax:gpu+jit``) runs every check's target side compiled by
the backend's ``jit`` (backends with the ``"jit"`` capability), so the core is tested traced
as well as eagerly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["ENV_VAR", "Target", "default_specs", "parse_specs", "spec_errors", "dtypes_for", "make_target"]

ENV_VAR = "REFORMER_CONFORMANCE_BACKENDS"
_DEFAULT_ORDER = ("numpy", "strict", "torch", "jax", "jax+jit")
JIT_SUFFIX = "+jit"


@dataclass(frozen=True)
class Target:
    spec: str
    backend: object  # a reformer_core backend object
    jit: bool = False  # run the target side compiled with backend.jit

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def device(self):
        return self.backend.device


def default_specs() -> list[str]:
    """The installed CPU backends among numpy, strict, torch, jax (GPU variants only when named)."""
    from reformer_core import available_backends

    installed = available_backends()
    return [spec for spec in _DEFAULT_ORDER if spec.removesuffix(JIT_SUFFIX) in installed]


def parse_specs(text: str | None) -> list[str]:
    """``"numpy, torch:cuda"`` -> ``["numpy", "torch:cuda"]``; None/empty/'all' -> the defaults."""
    text = text if text is not None else os.environ.get(ENV_VAR)
    if not text or text.strip() == "all":
        return default_specs()
    return [part.strip() for part in text.split(",") if part.strip()]


def spec_errors(specs: list[str]) -> list[str]:
    """One message per spec that can never run here, whatever the hardware: an unknown name,
    a registered backend whose framework is not installed (with the command that installs
    it), or a ``package.module:ClassName`` that does not load as a ``Backend`` subclass.
    Specs that are installed but lack a device here are not errors (they are skipped)."""
    from reformer_core._registry import adapter_class_from_spec, available_backends, install_hint, known_backends

    errors = []
    for spec in specs:
        base = spec.strip().removesuffix(JIT_SUFFIX).strip()
        name = base.partition(":")[0].strip().lower()
        if name in known_backends():
            if name not in available_backends():
                errors.append(f"backend {spec!r} is not installed here; install it with {install_hint(name)}")
        elif ":" in base:
            try:
                adapter_class_from_spec(base)
            except (ValueError, TypeError) as error:
                errors.append(str(error))
        else:
            errors.append(f"unknown backend {spec!r}; known backends: {', '.join(known_backends())} (installed here: "
                          f"{', '.join(available_backends()) or 'none'}), or a third-party adapter as "
                          f"'package.module:ClassName'; add {JIT_SUFFIX} to compile")
    return errors


def make_target(spec: str) -> tuple[Target | None, str | None]:
    """``(target, None)``, or ``(None, why it cannot run here)``."""
    from reformer_core._registry import resolve_backend

    jit = spec.endswith(JIT_SUFFIX)
    try:
        backend = resolve_backend(spec.removesuffix(JIT_SUFFIX))
    except (ValueError, TypeError, ImportError, RuntimeError) as error:  # not installed, no such device, no GPU
        return None, f"{spec}: {error}"
    if jit and "jit" not in backend.capabilities:
        return None, f"{spec}: backend {backend.name!r} cannot compile functions (no 'jit' capability)"
    if jit and not backend.jit_traces_vjp:
        return None, (f"{spec}: the suite compiles whole checks, vjp included, which {backend.name}'s jit cannot "
                      f"trace; its compiled path is checked against the eager one in the backend's own tests")
    return Target(spec, backend, jit), None


def dtypes_for(spec: str) -> list[str]:
    """Dtypes a target is tested in: float64 where the backend supports it, float32, and
    bfloat16 on frameworks that have it (torch, jax)."""
    target, _ = make_target(spec)
    if target is None:
        return ["float32"]
    dtypes = ["float32"]
    if "float64" in target.backend.capabilities:
        dtypes.insert(0, "float64")
    if "bfloat16" in target.backend.capabilities:
        dtypes.append("bfloat16")
    return dtypes
