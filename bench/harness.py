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

This module runs and times the rows; what to measure is :mod:`.settings`, which rows
:mod:`.targets`, the calls timed :mod:`.cases`, and the report's environment and derived
columns :mod:`.results`. Their public names are re-exported here.
"""

from __future__ import annotations

import datetime
import gc
import math
import time
from dataclasses import asdict
from typing import Any, Callable

from reformer_core import default_num_buckets, standard_path

from . import peers as peer_module
from .cases import call_for as _call_for  # bound here: _build_call looks it up in this module (tests replace it)
from .memory import rss_peak, traced_peak
from .report import format_report  # re-exported for callers of run_benchmark
from .results import SCHEMA, add_ratios, environment, rate_key, same_round_speedups
from .settings import (DEFAULT_HASHES, DEFAULT_LENGTHS, PASSES, QUICK_LENGTHS, SPEED_FIGURE_LENGTHS, BenchSettings,
                       estimate_peak_bytes, time_skip)
from .targets import (Target, bench_targets, planned_methods, planned_targets, resolve_backends, spec_options,
                      split_spec, torch_peer_spec)
from .threads import load_average, oversubscription_warnings, pinned_threads, usable_cpus
from .timing import attention_flops, best_rate, matmul_rate, projection_flops, rates, summarize, time_round_robin

__all__ = [
    "BenchSettings",
    "DEFAULT_HASHES",
    "DEFAULT_LENGTHS",
    "PASSES",
    "QUICK_LENGTHS",
    "SCHEMA",
    "SPEED_FIGURE_LENGTHS",
    "estimate_peak_bytes",
    "bench_targets",
    "format_report",
    "planned_methods",
    "planned_targets",
    "resolve_backends",
    "run_benchmark",
    "spec_options",
    "split_spec",
]

SKIPPED_MEMORY = "skipped: memory"
SKIPPED_TIME = "skipped: time"


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
                "device": str(target.backend.device), "runs_beside": torch_peer_spec(settings),
                "projections": True}
    memory_budget = settings.memory_budget_gb * 1e9
    with pinned_threads(threads) as thread_info:
        report["threads"] = thread_info
        report["warnings"] += oversubscription_warnings(threads, thread_info.get("pools_before"),
                                                        report["load_1min_start"])
        report["matmul"] = {}
        for target in targets:  # the yardstick of the % matmul column, once per device and dtype
            key = rate_key(target, settings)
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
            key = rate_key(target, settings)
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
    add_ratios(report)
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
        elif time_skip(target.method, (target.label, target.method.name, target.pass_name), done, length, settings,
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
        row["rate_key"] = rate_key(target, settings)
        if settings.measure_memory:
            try:
                row["peak_memory_bytes"], row["memory_kind"] = _peak_memory(target.backend, call)
            except Exception as error:  # MemoryError included: report it, go on with the rest
                row["status"], row["error"] = "error", f"{type(error).__name__}: {error}"
    same_round_speedups(group, rows)
    return rows
