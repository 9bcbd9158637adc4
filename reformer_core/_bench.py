"""Side-by-side benchmark of LSH attention (1, 2, 4, 8 hashes) against full attention.

``run_benchmark`` measures, per backend and sequence length, the forward time (median of
``repeats`` calls after ``warmup`` calls) and, in a separate call, the peak memory of each
method; ``format_report`` renders the result as terminal tables. ``reformer-core bench``
(``reformer_core.cli``) is a thin wrapper around the two. The report is a plain dict ready
for ``json.dump``.

Peak memory is measured where the backend can report it: NumPy (and array_api_strict, which
wraps NumPy) report every buffer to :mod:`tracemalloc`, so the peak is the extra host memory
one call allocates, its output included. Other backends report ``None`` for now.

A configuration is skipped, not run, when its estimated peak memory exceeds the budget or
when the time budget has run out (or would, judging by the same method at a shorter length).
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import re
import statistics
import time
import tracemalloc
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any, Callable

import numpy as np

from .backend import available_backends, known_backends, use_backend
from .config import default_num_buckets
from .full import full_attention
from .hashing import random_rotations
from .lsh import lsh_attention

__all__ = [
    "BenchSettings",
    "DEFAULT_LENGTHS",
    "QUICK_LENGTHS",
    "estimate_peak_bytes",
    "format_report",
    "resolve_backends",
    "run_benchmark",
]

SCHEMA = "reformer-core.bench/1"
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (1024, 2048, 4096)
DEFAULT_HASHES = (1, 2, 4, 8)
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
# Backends whose arrays live in NumPy buffers, which NumPy reports to tracemalloc.
_TRACEMALLOC_BACKENDS = frozenset({"numpy", "strict"})
SKIPPED_MEMORY = "skipped: memory"
SKIPPED_TIME = "skipped: time"


@dataclass(frozen=True)
class BenchSettings:
    """What to measure. Inputs are ``(batch, heads, length, head_dim)`` Gaussian arrays.

    ``num_buckets`` is ``default_num_buckets(length, chunk_length)`` at every length.
    """

    backends: tuple[str, ...] = ("numpy",)
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    num_hashes: tuple[int, ...] = DEFAULT_HASHES
    include_full: bool = True
    batch: int = 1
    heads: int = 2
    head_dim: int = 64
    chunk_length: int = 64
    num_chunks_before: int = 1
    num_chunks_after: int = 0
    causal: bool = True
    dtype: str = "float32"
    repeats: int = 3
    warmup: int = 1
    measure_memory: bool = True
    memory_budget_gb: float = 8.0
    time_budget_s: float | None = None
    seed: int = 0

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
            raise ValueError(
                f"every length must be a multiple of chunk_length={self.chunk_length}; got {bad}"
            )
        object.__setattr__(self, "lengths", lengths)
        hashes = tuple(sorted(set(positive_ints("num_hashes", self.num_hashes)))) if self.num_hashes else ()
        object.__setattr__(self, "num_hashes", hashes)
        if not hashes and not self.include_full:
            raise ValueError("nothing to measure: give at least one hash count or include full attention")
        if not self.backends:
            raise ValueError("give at least one backend")
        object.__setattr__(self, "backends", tuple(self.backends))
        if self.dtype not in _ITEMSIZE:
            raise ValueError(f"dtype must be one of {', '.join(_ITEMSIZE)}, got {self.dtype!r}")
        if not (self.memory_budget_gb > 0):
            raise ValueError(f"memory_budget_gb must be positive, got {self.memory_budget_gb!r}")
        if self.time_budget_s is not None and not (self.time_budget_s > 0):
            raise ValueError(f"time_budget_s must be positive, got {self.time_budget_s!r}")

    @property
    def methods(self) -> list["Method"]:
        methods = [Method(f"lsh-{n}", "lsh", n) for n in self.num_hashes]
        return methods + ([Method("full", "full", None)] if self.include_full else [])


@dataclass(frozen=True)
class Method:
    name: str  # "lsh-4", "full"
    kind: str  # "lsh" or "full"
    num_hashes: int | None = None

    @property
    def title(self) -> str:
        return f"lsh x{self.num_hashes}" if self.kind == "lsh" else "full"


def resolve_backends(spec: str | None) -> tuple[str, ...]:
    """Backend names from a comma-separated ``spec`` ("numpy,strict", "all"; None: numpy).

    Raises ``ValueError`` naming the known and installed backends for an unknown name, and
    the ``pip install`` extra for a known one that is not installed.
    """
    if spec is None or not spec.strip():
        return ("numpy",)
    names = [part.strip().lower() for part in spec.split(",") if part.strip()]
    if names == ["all"]:
        return available_backends()
    installed = available_backends()
    resolved = []
    for name in names:
        base = name.partition(":")[0]
        if base not in known_backends():
            raise ValueError(
                f"unknown backend {name!r}; known backends: {', '.join(known_backends())} "
                f"(installed here: {', '.join(installed) or 'none'})"
            )
        with use_backend(name):  # raises ValueError with the pip extra when not installed
            pass
        if name not in resolved:
            resolved.append(name)
    return tuple(resolved)


def estimate_peak_bytes(method: Method, length: int, settings: BenchSettings) -> int:
    """Conservative peak memory of one forward call, for deciding what to skip.

    Full attention holds a few ``(batch, heads, L, L)`` arrays: ``4 * L^2 * heads * batch``
    elements. LSH attention holds a few ``(batch, heads, n * L, window * chunk_length)``
    arrays (NumPy measures about 6 of them; 8 are budgeted).
    """
    itemsize = _ITEMSIZE[settings.dtype]
    rows = settings.batch * settings.heads
    inputs = 3 * rows * length * settings.head_dim * itemsize
    if method.kind == "full":
        return 4 * length * length * rows * itemsize + inputs
    window = (1 + settings.num_chunks_before + settings.num_chunks_after) * settings.chunk_length
    if length <= settings.chunk_length:  # plain attention over one chunk
        window = length
    return 8 * rows * method.num_hashes * length * window * itemsize + inputs


def _time_calls(fn: Callable[[], Any], synchronize: Callable[[], None], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
        synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        synchronize()
        times.append(time.perf_counter() - start)
        del out
    return times


def _tracemalloc_peak(fn: Callable[[], Any]) -> int:
    """Extra bytes allocated at the peak of one call (NumPy reports its buffers to tracemalloc)."""
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline, _ = tracemalloc.get_traced_memory()
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
        del out
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return max(0, peak - baseline)


def _peak_memory(backend: Any, fn: Callable[[], Any]) -> int | None:
    if backend.name in _TRACEMALLOC_BACKENDS:
        return _tracemalloc_peak(fn)
    return None  # no portable way yet for device memory of other frameworks


def _distribution_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Versions and hardware, for the JSON report (imports no framework)."""
    from . import __version__

    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable_cpus = os.cpu_count()
    memory_bytes = None
    try:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        pass
    return {
        "versions": {
            "reformer_core": __version__,
            "python": platform.python_version(),
            "python_implementation": platform.python_implementation(),
            "numpy": np.__version__,
            "array_api_compat": _distribution_version("array-api-compat"),
        },
        "hardware": {
            "platform": platform.platform(),
            "system": platform.system(),
            "machine": platform.machine(),
            "processor": platform.processor() or None,
            "cpu_count": os.cpu_count(),
            "usable_cpus": usable_cpus,
            "memory_bytes": memory_bytes,
        },
    }


def _inputs(backend: Any, length: int, settings: BenchSettings):
    rng = np.random.default_rng((settings.seed, length))
    shape = (settings.batch, settings.heads, length, settings.head_dim)
    qk = backend.from_numpy(rng.standard_normal(shape), dtype=settings.dtype)
    v = backend.from_numpy(rng.standard_normal(shape), dtype=settings.dtype)
    return qk, v


def _call_for(method: Method, qk: Any, v: Any, length: int, settings: BenchSettings, backend: Any):
    """``(zero-argument forward call, num_buckets)``; rotations are drawn outside the call."""
    if method.kind == "full":
        return (lambda: full_attention(qk, v, causal=settings.causal)), None
    num_buckets = default_num_buckets(length, settings.chunk_length)
    rotations = random_rotations(
        (settings.seed, method.num_hashes), settings.heads, settings.head_dim, method.num_hashes,
        num_buckets, like=qk,
    )

    def call():
        return lsh_attention(
            qk, v, rotations,
            num_buckets=num_buckets,
            chunk_length=settings.chunk_length,
            num_chunks_before=settings.num_chunks_before,
            num_chunks_after=settings.num_chunks_after,
            causal=settings.causal,
        )

    return call, num_buckets


def _time_skip(method: Method, length: int, done: dict, settings: BenchSettings, remaining: float) -> bool:
    """Whether the time budget has run out, or would run out, judging by a shorter length."""
    if remaining <= 0:
        return True
    previous = done.get(method.name)
    if previous is None:
        return False
    prev_length, prev_time = previous
    exponent = 2 if method.kind == "full" else 1
    calls = settings.warmup + settings.repeats + (1 if settings.measure_memory else 0)
    return prev_time * (length / prev_length) ** exponent * calls > remaining


def run_benchmark(settings: BenchSettings, progress: Any = None, *, argv: list[str] | None = None) -> dict:
    """Run every (backend, length, method) and return the JSON-ready report.

    ``progress``: an object with ``step(message)`` (e.g. :class:`reformer_core._progress.Progress`)
    told before each configuration. ``argv``: the command line, recorded in the report.
    """
    started = time.monotonic()
    report = {
        "schema": SCHEMA,
        "command": None if argv is None else ["reformer-core", *argv],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": asdict(settings),
        **environment(),
        "backends": {},
        "methods": [asdict(method) for method in settings.methods],
        "results": [],
    }
    memory_budget = settings.memory_budget_gb * 1e9
    for backend_name in settings.backends:
        with use_backend(backend_name) as backend:
            report["backends"][backend_name] = backend.describe()
            done: dict[str, tuple[int, float]] = {}  # method -> (length, median time) last measured
            for length in settings.lengths:
                qk = v = None
                for method in settings.methods:
                    if progress is not None:
                        progress.step(f"{backend_name} L={length} {method.title}")
                    row = {
                        "backend": backend_name,
                        "method": method.name,
                        "kind": method.kind,
                        "num_hashes": method.num_hashes,
                        "length": length,
                        "num_buckets": None,
                        "status": "ok",
                        "estimated_peak_bytes": estimate_peak_bytes(method, length, settings),
                        "times_s": [],
                        "time_s": None,
                        "peak_memory_bytes": None,
                    }
                    report["results"].append(row)
                    if method.kind == "lsh":
                        buckets = default_num_buckets(length, settings.chunk_length)
                        row["num_buckets"] = list(buckets) if isinstance(buckets, tuple) else buckets
                    if row["estimated_peak_bytes"] > memory_budget:
                        row["status"] = SKIPPED_MEMORY
                        continue
                    remaining = math.inf
                    if settings.time_budget_s is not None:
                        remaining = settings.time_budget_s - (time.monotonic() - started)
                    if _time_skip(method, length, done, settings, remaining):
                        row["status"] = SKIPPED_TIME
                        continue
                    try:
                        if qk is None:
                            qk, v = _inputs(backend, length, settings)
                        call, _ = _call_for(method, qk, v, length, settings, backend)
                        row["times_s"] = _time_calls(call, backend.synchronize, settings.warmup, settings.repeats)
                        row["time_s"] = statistics.median(row["times_s"])
                        done[method.name] = (length, row["time_s"])
                        if settings.measure_memory:
                            row["peak_memory_bytes"] = _peak_memory(backend, call)
                        del call
                    except Exception as error:  # MemoryError included: report it, go on with the rest
                        row["status"] = "error"
                        row["error"] = f"{type(error).__name__}: {error}"
                del qk, v
                gc.collect()
    _add_ratios(report)
    report["elapsed_s"] = round(time.monotonic() - started, 3)
    return report


def _add_ratios(report: dict) -> None:
    """``time_vs_first`` / ``memory_vs_first``: each value over the same method's at the shortest length."""
    first_length = report["settings"]["lengths"][0]
    firsts = {
        (row["backend"], row["method"]): row
        for row in report["results"]
        if row["length"] == first_length and row["status"] == "ok"
    }
    for row in report["results"]:
        first = firsts.get((row["backend"], row["method"]))
        for key, out in (("time_s", "time_vs_first"), ("peak_memory_bytes", "memory_vs_first")):
            ok = first is not None and row["status"] == "ok" and row[key] is not None and first[key]
            row[out] = round(row[key] / first[key], 3) if ok else None


# ---------------------------------------------------------------- rendering


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def format_bytes(count: int | None) -> str:
    if count is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            value = count / size
            return f"{value:.0f} {unit}" if value >= 100 else f"{value:.1f} {unit}"
    return f"{count} B"


def _table(header_rows: list[list[str]], rows: list[list[str]], first_width: int, cell_width: int) -> list[str]:
    lines = []
    for cells in header_rows + rows:
        line = f"{cells[0]:>{first_width}}" + "".join(f"  {c:>{cell_width}}" for c in cells[1:])
        lines.append(line.rstrip())
    return lines


def short_device(device: str) -> str:
    """``"array_api_strict.Device('device1')"`` -> ``"device1"``; other names unchanged."""
    match = re.fullmatch(r"[\w.]+\('(.*)'\)", str(device))
    return match.group(1) if match else str(device)


def format_report(report: dict) -> str:
    """Terminal tables: per backend, time and peak memory per method and length, then ratios."""
    settings = report["settings"]
    methods = [Method(**m) for m in report["methods"]]
    lengths = settings["lengths"]
    first = lengths[0]
    by_key = {(r["backend"], r["method"], r["length"]): r for r in report["results"]}
    sub = 9  # width of a time or memory sub-cell
    group = 2 * sub + 1
    lines = []
    for backend_name, described in report["backends"].items():
        flags = ", ".join(
            [f"batch {settings['batch']}", f"heads {settings['heads']}", f"head_dim {settings['head_dim']}",
             f"chunk_length {settings['chunk_length']}", "causal" if settings["causal"] else "not causal",
             settings["dtype"]]
        )
        lines.append(f"{backend_name} {described.get('version', '')} on {short_device(described.get('device', '?'))}: {flags}")
        lines.append(
            f"forward time (median of {settings['repeats']} after {settings['warmup']} warm-up) "
            f"and peak memory of one call; num_buckets = default_num_buckets(L, {settings['chunk_length']})"
        )
        header = [["", *[m.title.center(group) for m in methods]],
                  ["length", *[f"{'time':>{sub}} {'memory':>{sub}}" for m in methods]]]
        rows = []
        notes = set()
        for length in lengths:
            cells = [str(length)]
            for method in methods:
                row = by_key.get((backend_name, method.name, length))
                if row is None:
                    cells.append("")
                elif row["status"] == "ok":
                    cells.append(f"{format_seconds(row['time_s']):>{sub}} {format_bytes(row['peak_memory_bytes']):>{sub}}")
                elif row["status"] == "error":
                    cells.append("error")
                    notes.add(f"error at L={length} {method.title}: {row.get('error', '')}")
                else:
                    cells.append(row["status"])
            rows.append(cells)
        lines += _table(header, rows, 6, group)
        for note in sorted(notes):
            lines.append(f"  {note}")
        if any(by_key.get((backend_name, m.name, L), {}).get("status") == SKIPPED_MEMORY for m in methods for L in lengths):
            lines.append(
                f"  skipped: memory = estimated peak above --memory-budget-gb {settings['memory_budget_gb']:g}"
            )
        if any(by_key.get((backend_name, m.name, L), {}).get("status") == SKIPPED_TIME for m in methods for L in lengths):
            lines.append(f"  skipped: time = --time-budget {settings['time_budget_s']:g} s ran out")
        lines.append("")
        lines.append(f"time relative to L={first} (linear growth: L/{first}; quadratic: (L/{first})^2)")
        width = 8
        header = [["length", f"L/{first}", f"(L/{first})^2", *[m.title for m in methods]]]
        rows = []
        for length in lengths:
            scale = length / first
            cells = [str(length), f"{scale:g}", f"{scale * scale:g}"]
            for method in methods:
                ratio = by_key.get((backend_name, method.name, length), {}).get("time_vs_first")
                cells.append("-" if ratio is None else f"{ratio:.1f}x")
            rows.append(cells)
        lines += _table(header, rows, 6, width + 3)
        lines.append("")
    lines.append(f"total {format_seconds(report.get('elapsed_s'))}")
    return "\n".join(lines)
