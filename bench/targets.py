"""Which rows a run measures: backend specs (``torch:cuda+jit+standard``) and the planned targets.

A backend spec is a backend name with an optional device and the suffixes ``+jit`` (compile)
and ``+standard`` (run under ``reformer_core.standard_path()``): :func:`spec_options` parses
one, :func:`resolve_backends` and :func:`bench_targets` check a ``--backends`` list (skipping
devices that are not here), :func:`planned_methods` keeps the methods a backend can run, and
:func:`planned_targets` lists every row (a :class:`Target`) of a run in table order, the
peers of :mod:`.peers` last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reformer_core import available_backends, known_backends, use_backend

from . import peers as peer_module
from .settings import BenchSettings, Method

_DEFAULT_BACKENDS = ("numpy", "torch", "jax")
JIT_SUFFIX = "+jit"
STANDARD_SUFFIX = "+standard"
_SUFFIXES = (JIT_SUFFIX, STANDARD_SUFFIX)


def spec_options(spec: str) -> tuple[str, bool, bool]:
    """``(base, jit, standard)``: ``"torch:cuda+jit+standard"`` is ``("torch:cuda", True, True)``.
    ``+jit`` compiles; ``+standard`` runs under ``reformer_core.standard_path()`` (no native
    kernels), so the reference path stays measurable beside the default one. The suffixes
    may come in either order."""
    base, found = spec, set()
    while True:
        suffix = next((s for s in _SUFFIXES if base.endswith(s)), None)
        if suffix is None:
            return base, JIT_SUFFIX in found, STANDARD_SUFFIX in found
        found.add(suffix)
        base = base[: -len(suffix)]


def split_spec(spec: str) -> tuple[str, bool]:
    """``("torch:cuda", True)`` from ``"torch:cuda+jit"`` (and from ``"torch:cuda+jit+standard"``)."""
    base, jit, _ = spec_options(spec)
    return base, jit


def uses_jit(spec: str, backend: Any, settings: BenchSettings) -> bool:
    """A ``+jit`` spec compiles; plain ``jax`` does too (eager JAX is op by op) unless
    ``compile`` is off; other plain specs run eagerly."""
    return split_spec(spec)[1] or (settings.compile and backend.name == "jax")


def planned_methods(spec: str, settings: BenchSettings) -> list[Method]:
    """The methods one backend spec runs."""
    base, _ = split_spec(spec)
    with use_backend(base) as backend:
        jit = uses_jit(spec, backend, settings)
        return [method for method in settings.methods if method.runs_on(backend, jit)]


def resolve_backends(spec: str | None) -> tuple[str, ...]:
    """Backend specs from ``"numpy,torch:cuda"``; ``"all"`` or None: the installed CPU backends
    among numpy, torch and jax. Unknown or missing ones raise ``ValueError`` naming the fix."""
    installed = available_backends()
    if spec is None or not spec.strip() or spec.strip() == "all":
        return tuple(name for name in _DEFAULT_BACKENDS if name in installed) or ("numpy",)
    resolved = []
    for name in (part.strip().lower() for part in spec.split(",") if part.strip()):
        base, jit = split_spec(name)
        if base.partition(":")[0] not in known_backends():
            raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(known_backends())} "
                             f"(installed here: {', '.join(installed) or 'none'}); add {JIT_SUFFIX} to compile")
        with use_backend(base) as backend:  # raises ValueError with the pip extra when not installed
            if jit and "jit" not in backend.capabilities:
                raise ValueError(f"{name}: backend {backend.name!r} cannot compile functions; drop {JIT_SUFFIX}")
        if name not in resolved:
            resolved.append(name)
    return tuple(resolved)


@dataclass
class Target:
    """One row to measure: a backend spec's method and pass, or a peer's (``peer`` set)."""

    label: str  # the row's "backend": a spec such as "torch+jit", or a peer name such as "hf-transformers"
    method: Method
    pass_name: str
    backend: Any  # the adapter (for a peer: the torch backend it runs beside)
    jit: bool = False
    standard: bool = False
    peer: str | None = None


def torch_peer_spec(settings: BenchSettings) -> str | None:
    """The first plain torch spec of the run (peers run on its device), if any."""
    for spec in settings.backends:
        base, jit, standard = spec_options(spec)
        if base.partition(":")[0] == "torch" and not (jit or standard):
            return spec
    return None


def planned_targets(settings: BenchSettings) -> list[Target]:
    """Every row the run measures, in table order: each backend spec's methods and passes, then
    the peers (when ``settings.peers`` and a plain torch spec is among the backends)."""
    from reformer_core._registry import resolve_backend

    targets = []
    for spec in settings.backends:
        base, _, standard = spec_options(spec)
        backend = resolve_backend(base)
        jit = uses_jit(spec, backend, settings)
        for method in planned_methods(spec, settings):
            for pass_name in method.passes(settings):
                targets.append(Target(spec, method, pass_name, backend, jit, standard))
    torch_spec = torch_peer_spec(settings) if settings.peers else None
    if torch_spec is not None:
        backend = resolve_backend(torch_spec)
        for peer in peer_module.installed_peers():
            for method in settings.methods:
                if method.kind in peer_module.PEER_METHODS[peer]:
                    for pass_name in settings.passes:
                        targets.append(Target(peer, method, pass_name, backend, peer=peer))
    return targets


def device_unavailable(spec: str) -> str | None:
    """Why a backend spec's device is not here (``"torch:cuda"`` without a GPU), else None.

    Only a device that is well-formed but absent counts; unknown backends, frameworks that are
    not installed and malformed devices are left to :func:`resolve_backends` (exit status 2)."""
    from reformer_core._registry import resolve_backend

    base, _, _ = spec_options(spec.strip().lower())
    name, sep, device = base.partition(":")
    if not sep or not device.strip() or name not in available_backends():
        return None
    try:
        resolve_backend(base)
    except ValueError as error:
        if "has no device" in str(error):
            return str(error)
        raise
    return None


def bench_targets(spec: str | None) -> tuple[tuple[str, ...], dict[str, str]]:
    """``(backend specs to run, {spec: reason} skipped)`` for ``--backends``.

    A spec whose device is not here (``torch:cuda`` on a machine without a GPU) is skipped with
    its reason and the others run; every other problem (unknown name, framework missing,
    malformed device) raises ``ValueError`` from :func:`resolve_backends`, before any work. When
    every spec is skipped, ``ValueError`` too."""
    if spec is None or not spec.strip() or spec.strip() == "all":
        return resolve_backends(spec), {}
    skipped, kept = {}, []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        reason = device_unavailable(part)
        if reason is None:
            kept.append(part)
        else:
            skipped[part.lower()] = reason
    if not kept:
        raise ValueError("no backend of --backends can run here: "
                         + "; ".join(f"{name}: {reason}" for name, reason in skipped.items()))
    return resolve_backends(",".join(kept)), skipped
