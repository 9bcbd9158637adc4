"""Side-by-side benchmark of the attention kinds and a training step, on every selected backend.

``run_benchmark`` measures, per backend, sequence length, method (LSH with 1/2/4/8 hashes,
local, full, a whole training step) and pass (forward; forward+backward), the first call's
time (warm-up, compilation included) apart from ``repeats`` later calls (min, median, max,
spread; :mod:`.timing`), achieved GFLOP/s against a matmul rate measured in the same run,
and, in a separate call, the peak memory. The rows of one length and pass (every backend,
method and peer, :mod:`.peers`) are timed round-robin, one call each per round, with every
framework's threads pinned (:mod:`.threads`). ``reformer_core.bench.report`` renders the tables and
plots; ``reformer-core bench`` is a thin wrapper. The report is a plain dict for ``json.dump``.

Peak memory is what the backend can report: NumPy (and array_api_strict) buffers through
:mod:`tracemalloc`; a GPU backend's device allocator (``Backend.peak_device_memory``); on
other CPU backends the process's resident memory, sampled during the call. Each row says
which (``memory_kind``).

The paper's speed figure (Figure 5, right) is ``fixed_tokens=32768``: the batch is
``32768 // length`` so every length processes the same number of tokens.

A configuration is skipped, not run, when its estimated peak memory exceeds the budget or
when the time budget has run out (or would, judging by the same method at a shorter length).
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any, Callable

import numpy as np

from reformer_core import (
    Differentiable,
    ReformerConfig,
    __version__,
    available_backends,
    default_num_buckets,
    full_attention,
    full_attention_vjp,
    init_params,
    known_backends,
    local_attention,
    local_attention_vjp,
    lsh_attention,
    lsh_attention_vjp,
    random_rotations,
    standard_path,
    use_backend,
    value_and_grad,
)

from . import peers as peer_module
from .memory import rss_peak, traced_peak
from .report import format_report  # re-exported for callers of run_benchmark
from .threads import load_average, oversubscription_warnings, pinned_threads, usable_cpus
from .timing import (DEFAULT_MAX_SPREAD, attention_flops, best_rate, matmul_rate, paired_ratio, projection_flops,
                     rates, summarize, time_round_robin)

__all__ = [
    "BenchSettings",
    "DEFAULT_LENGTHS",
    "QUICK_LENGTHS",
    "SPEED_FIGURE_LENGTHS",
    "estimate_peak_bytes",
    "bench_targets",
    "format_report",
    "planned_targets",
    "resolve_backends",
    "run_benchmark",
    "spec_options",
]

SCHEMA = "reformer-core.bench/3"
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (1024, 2048)
SPEED_FIGURE_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_HASHES = (1, 2, 4, 8)
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
_DEFAULT_BACKENDS = ("numpy", "torch", "jax")
SKIPPED_MEMORY = "skipped: memory"
SKIPPED_TIME = "skipped: time"
PASSES = ("forward", "backward")


@dataclass(frozen=True)
class BenchSettings:
    """What to measure. Attention inputs are ``(batch, heads, length, head_dim)`` Gaussians;
    ``num_buckets`` is ``default_num_buckets(length, chunk_length)``. ``fixed_tokens`` (the
    paper's speed figure) sets the batch to ``fixed_tokens // length`` at each length."""

    backends: tuple[str, ...] = ("numpy",)
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    num_hashes: tuple[int, ...] = DEFAULT_HASHES
    include_full: bool = True
    include_local: bool = True
    include_train: bool = True
    passes: tuple[str, ...] = PASSES
    batch: int = 1
    fixed_tokens: int | None = None
    heads: int = 2
    head_dim: int = 64
    chunk_length: int = 64
    num_chunks_before: int = 1
    num_chunks_after: int = 0
    causal: bool = True
    dtype: str = "float32"
    repeats: int = 3
    warmup: int = 1
    compile: bool = True
    measure_memory: bool = True
    memory_budget_gb: float = 8.0
    time_budget_s: float | None = None
    seed: int = 0
    threads: int | None = None  # None: the cores available to the process
    max_spread: float = DEFAULT_MAX_SPREAD
    peers: bool = True

    def __post_init__(self) -> None:
        def positive_ints(name, values):
            values = tuple(values)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be one or more positive integers, got {values!r}")
            return values

        for name in ("batch", "heads", "head_dim", "chunk_length", "repeats"):
            positive_ints(name, (getattr(self, name),))
        for name in ("warmup", "num_chunks_before", "num_chunks_after", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        lengths = tuple(sorted(set(positive_ints("lengths", self.lengths))))
        bad = [length for length in lengths if length % self.chunk_length]
        if bad:
            raise ValueError(f"every length must be a multiple of chunk_length={self.chunk_length}; got {bad}")
        if self.fixed_tokens is not None:
            too_long = [length for length in lengths if length > self.fixed_tokens]
            if too_long:
                raise ValueError(f"lengths {too_long} exceed fixed_tokens={self.fixed_tokens}")
        object.__setattr__(self, "lengths", lengths)
        hashes = tuple(sorted(set(positive_ints("num_hashes", self.num_hashes)))) if self.num_hashes else ()
        object.__setattr__(self, "num_hashes", hashes)
        if not (hashes or self.include_full or self.include_local or self.include_train):
            raise ValueError("nothing to measure: give a hash count or include full, local or train")
        unknown = set(self.passes) - set(PASSES)
        if unknown or not self.passes:
            raise ValueError(f"passes must be among {PASSES}, got {self.passes!r}")
        object.__setattr__(self, "passes", tuple(p for p in PASSES if p in self.passes))
        if not self.backends:
            raise ValueError("give at least one backend")
        object.__setattr__(self, "backends", tuple(self.backends))
        if self.dtype not in _ITEMSIZE:
            raise ValueError(f"dtype must be one of {', '.join(_ITEMSIZE)}, got {self.dtype!r}")
        if not (self.memory_budget_gb > 0):
            raise ValueError(f"memory_budget_gb must be positive, got {self.memory_budget_gb!r}")
        if self.time_budget_s is not None and not (self.time_budget_s > 0):
            raise ValueError(f"time_budget_s must be positive, got {self.time_budget_s!r}")
        if self.threads is not None:
            positive_ints("threads", (self.threads,))
        if not (self.max_spread >= 1):
            raise ValueError(f"max_spread must be at least 1 (max over min of the timed calls), got {self.max_spread!r}")

    def batch_at(self, length: int) -> int:
        return self.fixed_tokens // length if self.fixed_tokens else self.batch

    @property
    def methods(self) -> list["Method"]:
        methods = [Method(f"lsh-{n}", "lsh", n) for n in self.num_hashes]
        if self.include_local:
            methods.append(Method("local", "local"))
        if self.include_full:
            methods.append(Method("full", "full"))
            methods.append(Method("native-full", "native"))
        if self.include_train:
            methods.append(Method("train", "train"))
        return methods


@dataclass(frozen=True)
class Method:
    name: str  # "lsh-4", "local", "full", "native-full", "train"
    kind: str  # "lsh", "local", "full", "native" (the framework's fused kernel) or "train"
    num_hashes: int | None = None

    @property
    def title(self) -> str:
        return {"lsh": f"lsh x{self.num_hashes}", "train": "train step",
                "native": "full (native kernel)"}.get(self.kind, self.kind)

    def passes(self, settings: BenchSettings) -> tuple[str, ...]:
        return ("step",) if self.kind == "train" else settings.passes

    def runs_on(self, backend: Any, jit: bool) -> bool:
        """Native kernels only where the backend has one; a compiled training step only where
        jit can trace the backend's vjp (so not with torch.compile: ``torch`` runs it eagerly)."""
        if self.kind == "native":
            return "native-attention" in backend.capabilities
        return not (self.kind == "train" and jit and not backend.jit_traces_vjp)


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


def estimate_peak_bytes(method: Method, length: int, settings: BenchSettings, pass_name: str = "forward",
                        backend: Any = None) -> int:
    """Conservative peak memory of one call, for deciding what to skip.

    Full attention holds a few ``(batch, heads, L, L)`` arrays: ``4 * L^2 * heads * batch``
    elements (twice that with the backward). LSH holds a few ``(batch, heads, n * L, window)``
    arrays (about 6 measured on NumPy, 8 budgeted; 16 with the backward).
    """
    itemsize = _ITEMSIZE[settings.dtype]
    rows = settings.batch_at(length) * settings.heads
    inputs = 3 * rows * length * settings.head_dim * itemsize
    factor = 2 if pass_name != "forward" else 1
    if method.kind == "native" and backend is not None and backend.native_attention_linear_memory:
        return 4 * inputs  # a flash-style kernel: no L x L array
    if method.kind in ("full", "native"):  # other native kernels (XLA's on the CPU) hold L x L
        return factor * 4 * length * length * rows * itemsize + inputs
    window = (1 + settings.num_chunks_before + settings.num_chunks_after) * settings.chunk_length
    if length <= settings.chunk_length:
        window = length
    rounds = method.num_hashes or (2 if method.kind == "train" else 1)
    layers = 2 if method.kind == "train" else 1
    return factor * 8 * rows * rounds * length * window * itemsize * layers + inputs


# ---------------------------------------------------------------- measuring


def time_calls(fn: Callable[[], Any], synchronize: Callable[..., None], warmup: int, repeats: int):
    """``(first call seconds, [later call seconds])``: the first includes warm-up and compilation."""
    first = None
    for _ in range(max(warmup, 1)):
        start = time.perf_counter()
        synchronize(fn())
        first = time.perf_counter() - start if first is None else first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        synchronize(fn())
        times.append(time.perf_counter() - start)
    return first, times


def _peak_memory(backend: Any, fn: Callable[[], Any]) -> tuple[int | None, str]:
    if "tracemalloc" in backend.capabilities:  # NumPy buffers: counted exactly
        return traced_peak(fn)[1], "host (tracemalloc)"
    if "gpu" in backend.capabilities:
        try:
            return backend.peak_device_memory(fn), "device"
        except NotImplementedError:  # a GPU whose framework exposes no allocator statistics
            pass
    return rss_peak(fn, backend.synchronize), "host (RSS)"


def _attention_functions(method: Method, length: int, settings: BenchSettings, backend: Any):
    """``(forward(qk, v), rule(qk, v))`` with rotations drawn outside, and the bucket count."""
    common = {"causal": settings.causal}
    if method.kind == "native":
        def no_rule(qk, v):
            raise TypeError("native attention is differentiated by the framework's autodiff only")

        return (lambda qk, v: backend.native_full_attention(qk, qk, v, **common), no_rule), None
    if method.kind == "full":
        return (lambda qk, v: full_attention(qk, v, **common),
                lambda qk, v: full_attention_vjp(qk, v, **common)), None
    chunks = {"chunk_length": settings.chunk_length, "num_chunks_before": settings.num_chunks_before,
              "num_chunks_after": settings.num_chunks_after, **common}
    if method.kind == "local":
        return (lambda qk, v: local_attention(qk, qk, v, **chunks),
                lambda qk, v: _local_rule(qk, v, chunks)), None
    num_buckets = default_num_buckets(length, settings.chunk_length)
    rotations = random_rotations((settings.seed, method.num_hashes), settings.heads, settings.head_dim,
                                 method.num_hashes, num_buckets, backend=backend, dtype=settings.dtype)
    kwargs = {**chunks, "num_buckets": num_buckets}
    return (lambda qk, v: lsh_attention(qk, v, rotations, **kwargs),
            lambda qk, v: lsh_attention_vjp(qk, v, rotations, **kwargs)), num_buckets


def _local_rule(qk, v, chunks):
    out, pullback = local_attention_vjp(qk, qk, v, **chunks)

    def pull(d_out):
        d_q, d_k, d_v = pullback(d_out)
        return d_q + d_k, d_v

    return out, pull


def _train_config(settings: BenchSettings, length: int) -> ReformerConfig:
    side = 2 ** math.ceil(math.log2(length) / 2)
    return ReformerConfig(vocab_size=256, d_model=128, num_heads=settings.heads, head_dim=settings.head_dim,
                          d_ff=256, attention_layers=("lsh", "local"), num_hashes=2,
                          lsh_chunk_length=settings.chunk_length, local_chunk_length=settings.chunk_length,
                          ff_chunk_length=1024, causal=settings.causal, axial_pos_shape=(side, side))


def _call_for(method: Method, pass_name: str, length: int, settings: BenchSettings, backend: Any, jit: bool = False):
    """``(zero-argument call, num_buckets)`` for one configuration; inputs are made here."""
    rng = np.random.default_rng((settings.seed, length))
    batch = settings.batch_at(length)
    if method.kind == "train":
        config = _train_config(settings, length)
        params = init_params(config, settings.seed, backend=backend, dtype=settings.dtype)
        tokens = backend.from_numpy(rng.integers(0, config.vocab_size, (batch, length)))
        def step(params, tokens):
            return value_and_grad(params, tokens, tokens, config, rotations_seed=1, check_values=False)

        if jit:  # only where jit traces the backend's vjp (runs_on)
            step = backend.jit(step)
        return (lambda: step(params, tokens)), None
    shape = (batch, settings.heads, length, settings.head_dim)
    qk, v, d_out = (backend.from_numpy(rng.standard_normal(shape), dtype=settings.dtype) for _ in range(3))
    (forward, rule), num_buckets = _attention_functions(method, length, settings, backend)
    if jit and not backend.jit_traces_vjp:
        forward = backend.jit(forward)  # the framework differentiates the compiled forward
    if pass_name == "forward":
        fn = forward
        args = (qk, v)
    else:
        differentiable = Differentiable(forward, rule, method.name)

        def fn(qk, v, d_out):
            _, pullback = backend.vjp(differentiable, qk, v)
            return pullback(d_out)

        args = (qk, v, d_out)
    if jit and backend.jit_traces_vjp:
        fn = backend.jit(fn)
    return (lambda: fn(*args)), num_buckets


def _time_skip(method: Method, key: tuple, done: dict, length: int, settings: BenchSettings, remaining: float) -> bool:
    """Whether the time budget has run out, or would run out, judging by a shorter length."""
    if remaining <= 0:
        return True
    previous = done.get(key)
    if previous is None:
        return False
    prev_length, prev_time = previous
    exponent = 2 if method.kind == "full" else 1
    calls = settings.warmup + settings.repeats + (1 if settings.measure_memory else 0)
    return prev_time * (length / prev_length) ** exponent * calls > remaining


def _distribution_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Versions and hardware, for the JSON report (imports no framework)."""
    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable_cpus = os.cpu_count()
    memory_bytes = None
    try:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        pass
    versions = {"reformer_core": __version__, "python": platform.python_version(),
                "python_implementation": platform.python_implementation(), "numpy": np.__version__}
    for name in ("array-api-compat", "torch", "jax", "jaxlib", "cupy-cuda12x", "matplotlib"):
        versions[name.replace("-", "_")] = _distribution_version(name)
    return {
        "versions": versions,
        "hardware": {"platform": platform.platform(), "system": platform.system(), "machine": platform.machine(),
                     "processor": platform.processor() or None, "cpu_count": os.cpu_count(),
                     "usable_cpus": usable_cpus, "memory_bytes": memory_bytes},
    }


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


def _torch_peer_spec(settings: BenchSettings) -> str | None:
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
    torch_spec = _torch_peer_spec(settings) if settings.peers else None
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


def _rate_key(target: Target, settings: BenchSettings) -> str:
    return f"{target.backend.name}:{target.backend.device}:{settings.dtype}"


def run_benchmark(settings: BenchSettings, progress: Any = None, *, argv: list[str] | None = None,
                  skipped_backends: dict[str, str] | None = None, clock: Callable[[], float] = time.perf_counter
                  ) -> dict:
    """Run every (backend, length, method, pass) and return the JSON-ready report.

    For each length and pass, every row of every backend (and peer) is timed round-robin: a
    warm-up call each, then ``repeats`` rounds of one call each (A B A B), so load that comes
    and goes hits them alike; ratios between rows are taken round by round. Threads are pinned
    to ``settings.threads`` (default: the usable cores) for the whole run.

    ``progress``: an object with ``step(message)`` told before each row's first call (and,
    optionally, ``note(message)`` between rounds).
    """
    started = time.monotonic()
    threads = settings.threads or usable_cpus()
    report = {
        "schema": SCHEMA,
        "command": None if argv is None else ["reformer-core", *argv],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {**asdict(settings), "threads": threads},
        **environment(),
        "backends": {},
        "skipped_backends": dict(skipped_backends or {}),
        "methods": [asdict(method) for method in settings.methods],
        "results": [],
        "warnings": [],
    }
    report["load_1min_start"] = load_average()
    targets = planned_targets(settings)
    for target in targets:
        if target.label in report["backends"]:
            continue
        if target.peer is None:
            report["backends"][target.label] = {**target.backend.describe(), "compiled": target.jit,
                                                "standard_path": target.standard}
        else:
            report["backends"][target.label] = {
                "backend": target.label, "peer": True, "version": peer_module.peer_versions().get(target.peer),
                "device": str(target.backend.device), "runs_beside": _torch_peer_spec(settings),
                "projections": True}
    memory_budget = settings.memory_budget_gb * 1e9
    with pinned_threads(threads) as thread_info:
        report["threads"] = thread_info
        report["warnings"] += oversubscription_warnings(threads, thread_info.get("pools_before"),
                                                        report["load_1min_start"])
        report["matmul"] = {}
        for target in targets:  # the yardstick of the % matmul column, once per device and dtype
            key = _rate_key(target, settings)
            if key not in report["matmul"]:
                report["matmul"][key] = matmul_rate(target.backend, settings.dtype)
        done: dict[tuple, tuple[int, float]] = {}
        for length in settings.lengths:
            for pass_name in (*settings.passes, "step"):
                group = [t for t in targets if t.pass_name == pass_name]
                if group:
                    report["results"] += _measure_group(group, length, settings, done, memory_budget, started,
                                                        progress, clock)
            gc.collect()
        for target in targets:  # again at the end: the better of the two is the yardstick
            key = _rate_key(target, settings)
            if "measured" not in report["matmul"][key]:
                report["matmul"][key] = best_rate(report["matmul"][key], matmul_rate(target.backend, settings.dtype))
    report["load_1min_end"] = load_average()
    for row in report["results"]:
        matmul = report["matmul"].get(row.pop("rate_key", None), {})
        row["gflops"], row["matmul_pct"] = rates(row["flops"], row["time_s"], matmul.get("gflops"))
    noisy = [r for r in report["results"] if r.get("noisy")]
    if noisy:
        report["warnings"].append(f"{len(noisy)} row(s) with spread (max/min of the timed calls) above "
                                  f"{settings.max_spread:g}, marked '!': timings disturbed; rerun on an idle machine "
                                  f"or with more --repeats")
    _add_ratios(report)
    report["elapsed_s"] = round(time.monotonic() - started, 3)
    return report


def _new_row(target: Target, length: int, settings: BenchSettings) -> dict:
    method = target.method
    row = {
        "backend": target.label, "peer": target.peer is not None, "method": method.name, "kind": method.kind,
        "num_hashes": method.num_hashes, "pass": target.pass_name, "length": length, "batch": settings.batch_at(length),
        "num_buckets": None, "status": "ok",
        "estimated_peak_bytes": estimate_peak_bytes(method, length, settings, target.pass_name, target.backend),
        "first_call_s": None, "times_s": [], "time_s": None, "min_s": None, "median_s": None, "max_s": None,
        "iqr_s": None, "spread": None, "noisy": False, "flops": None, "gflops": None, "matmul_pct": None,
        "reference": None, "speedup": None, "peak_memory_bytes": None, "memory_kind": None,
        "load_1min": load_average(),
    }
    if method.kind == "lsh":
        buckets = default_num_buckets(length, settings.chunk_length)
        row["num_buckets"] = list(buckets) if isinstance(buckets, tuple) else buckets
    common = {"batch": row["batch"], "heads": settings.heads, "length": length, "head_dim": settings.head_dim,
              "chunk_length": settings.chunk_length, "num_chunks_before": settings.num_chunks_before,
              "num_chunks_after": settings.num_chunks_after, "num_hashes": method.num_hashes}
    row["flops"] = attention_flops(method.kind, target.pass_name, **common)
    if target.peer is not None and row["flops"] is not None:
        width = settings.heads * settings.head_dim
        row["flops"] += projection_flops(target.pass_name, batch=row["batch"], length=length, d_model=width,
                                         width=width, outputs=3 if method.kind == "local" else 2)
    return row


def _build_call(target: Target, length: int, settings: BenchSettings) -> Callable[[], Any]:
    if target.peer is not None:
        return peer_module.peer_call(
            target.peer, target.method.kind, target.method.num_hashes, target.pass_name, batch=settings.batch_at(length),
            length=length, heads=settings.heads, head_dim=settings.head_dim, chunk_length=settings.chunk_length,
            num_chunks_before=settings.num_chunks_before, num_chunks_after=settings.num_chunks_after,
            causal=settings.causal, device=target.backend.device, dtype=settings.dtype, seed=settings.seed)
    call, _ = _call_for(target.method, target.pass_name, length, settings, target.backend, target.jit)
    if not target.standard:
        return call

    def on_standard_path():
        with standard_path():
            return call()

    return on_standard_path


def _measure_group(group: list[Target], length: int, settings: BenchSettings, done: dict, memory_budget: float,
                   started: float, progress: Any, clock: Callable[[], float]) -> list[dict]:
    """The rows of one (length, pass), timed round-robin."""
    rows = [_new_row(target, length, settings) for target in group]
    remaining = math.inf
    if settings.time_budget_s is not None:
        remaining = settings.time_budget_s - (time.monotonic() - started)
    live: list[tuple[int, Callable[[], Any]]] = []
    for index, (target, row) in enumerate(zip(group, rows)):
        reason = None
        if target.peer is not None:
            reason = peer_module.peer_supports(target.peer, target.method.kind, length,
                                               chunk_length=settings.chunk_length,
                                               num_chunks_before=settings.num_chunks_before,
                                               num_chunks_after=settings.num_chunks_after)
        if reason is not None:
            row["status"], row["reason"] = "skipped: shape", reason
        elif row["estimated_peak_bytes"] > memory_budget:
            row["status"] = SKIPPED_MEMORY
        elif _time_skip(target.method, (target.label, target.method.name, target.pass_name), done, length, settings,
                        remaining):
            row["status"] = SKIPPED_TIME
        else:
            try:
                live.append((index, _build_call(target, length, settings)))
            except Exception as error:
                row["status"], row["error"] = "error", f"{type(error).__name__}: {error}"
    if not live:
        return rows

    def describe(index: int) -> str:
        target = group[index]
        return f"L={length} {target.pass_name} {target.label} {target.method.title}"

    def on_warmup(position: int) -> None:
        if progress is not None:
            progress.step(describe(live[position][0]) + " (first call)")

    def on_round(round_index: int) -> None:
        note = getattr(progress, "note", None)
        if callable(note):
            note(f"L={length} {group[live[0][0]].pass_name}: round {round_index + 1}/{settings.repeats} "
                 f"over {len(live)} rows")

    def on_error(position: int, error: BaseException) -> None:
        row = rows[live[position][0]]
        row["status"], row["error"] = "error", f"{type(error).__name__}: {error}"

    calls = [(call, group[index].backend.synchronize) for index, call in live]
    timings = time_round_robin(calls, settings.warmup, settings.repeats, clock=clock, on_warmup=on_warmup,
                               on_round=on_round, on_error=on_error)
    for (index, call), (first, times) in zip(live, timings):
        target, row = group[index], rows[index]
        row["first_call_s"], row["times_s"] = first, list(times)
        if row["status"] != "ok":
            continue
        row.update(summarize(times, settings.max_spread))
        row["time_s"] = row["median_s"]
        done[(target.label, target.method.name, target.pass_name)] = (length, row["time_s"])
        row["rate_key"] = _rate_key(target, settings)
        if settings.measure_memory:
            try:
                row["peak_memory_bytes"], row["memory_kind"] = _peak_memory(target.backend, call)
            except Exception as error:  # MemoryError included: report it, go on with the rest
                row["status"], row["error"] = "error", f"{type(error).__name__}: {error}"
    _same_round_speedups(group, rows)
    return rows


def _same_round_speedups(group: list[Target], rows: list[dict]) -> None:
    """``speedup`` = the reference row's time over this row's, median over the same rounds: for a
    backend's rows the same backend's full attention (the core's), for a peer's rows HF's
    layer of the same method (``reference`` names it)."""
    ok = {(row["backend"], row["method"]): row for row in rows if row["status"] == "ok"}
    for target, row in zip(group, rows):
        if row["status"] != "ok":
            continue
        reference = ("hf-transformers", row["method"]) if target.peer is not None else (row["backend"], "full")
        other = ok.get(reference)
        if other is None or other is row or row["kind"] == "train":
            continue
        row["reference"] = f"{reference[0]} {reference[1]}"
        row["speedup"] = paired_ratio(other["times_s"], row["times_s"])


def _add_ratios(report: dict) -> None:
    """``time_vs_first`` / ``memory_vs_first``: each value over the same method's at the shortest length."""
    first_length = report["settings"]["lengths"][0]
    firsts = {(r["backend"], r["method"], r["pass"]): r for r in report["results"]
              if r["length"] == first_length and r["status"] == "ok"}
    for row in report["results"]:
        first = firsts.get((row["backend"], row["method"], row["pass"]))
        for key, out in (("time_s", "time_vs_first"), ("peak_memory_bytes", "memory_vs_first")):
            ok = first is not None and row["status"] == "ok" and row[key] is not None and first[key]
            row[out] = round(row[key] / first[key], 3) if ok else None
