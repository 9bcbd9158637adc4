"""Timing that makes noise visible: round-robin timing, per-row statistics, FLOP counts, matmul rate.

* :func:`time_round_robin` times several calls alternately (A B A B ...): a warm-up call of
  each, then ``repeats`` rounds of one timed call each, so a burst of load from another
  process hits every call alike, and ratios can be taken round by round (:func:`paired_ratio`).
* :func:`summarize` gives a row's min / median / max / interquartile range and flags it when
  its spread (max over min) exceeds a threshold.
* :func:`attention_flops` is the counting rule behind the GFLOP/s column (see
  ``docs/guide.md``); :func:`matmul_rate` the square-matmul rate each row is compared with.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["DEFAULT_MAX_SPREAD", "time_round_robin", "summarize", "paired_ratio", "attention_flops",
           "projection_flops", "matmul_rate", "best_rate", "rates"]

DEFAULT_MAX_SPREAD = 1.5  # a row whose slowest timed call took over 1.5x its fastest is flagged


def time_round_robin(calls: Sequence[tuple[Callable[[], Any], Callable[..., None]]], warmup: int, repeats: int,
                     clock: Callable[[], float] = time.perf_counter,
                     on_warmup: Callable[[int], None] | None = None, on_round: Callable[[int], None] | None = None,
                     on_error: Callable[[int, BaseException], None] | None = None):
    """Time ``calls`` (``(fn, synchronize)`` pairs) alternately.

    First every call's warm-up (``max(warmup, 1)`` calls each; the first is reported apart:
    compilation and first allocations), then ``repeats`` rounds in which each call runs once,
    in order: A B C, A B C, ... Returns one ``(first_seconds, [seconds per round])`` per call;
    ``times[r]`` of two calls come from the same round ``r``. A call that raises is reported to
    ``on_error(index, error)`` (or re-raised when there is none) and leaves the rounds;
    its entry is ``(first or None, the rounds done so far)``. ``on_warmup(index)`` is told before
    each call's warm-up, ``on_round(r)`` before each round (for progress displays).
    """
    results: list[list] = [[None, []] for _ in calls]
    alive = list(range(len(calls)))

    def timed(index: int) -> float | None:
        fn, synchronize = calls[index]
        try:
            start = clock()
            synchronize(fn())
            return clock() - start
        except Exception as error:  # MemoryError included: the other calls go on
            if on_error is None:
                raise
            on_error(index, error)
            alive.remove(index)
            return None

    for index in list(alive):
        if on_warmup is not None:
            on_warmup(index)
        for _ in range(max(warmup, 1)):
            seconds = timed(index)
            if seconds is None:
                break
            if results[index][0] is None:
                results[index][0] = seconds
    for round_index in range(repeats):
        if on_round is not None:
            on_round(round_index)
        for index in list(alive):
            seconds = timed(index)
            if seconds is not None:
                results[index][1].append(seconds)
    return [tuple(result) for result in results]


def summarize(times: Sequence[float], max_spread: float = DEFAULT_MAX_SPREAD) -> dict:
    """``min_s``, ``median_s``, ``max_s``, ``iqr_s`` (interquartile range), ``spread`` (max/min)
    and ``noisy`` (spread above ``max_spread``) of one row's timed calls."""
    times = [float(t) for t in times]
    if not times:
        return {"min_s": None, "median_s": None, "max_s": None, "iqr_s": None, "spread": None, "noisy": False}
    low, high = min(times), max(times)
    q1, _, q3 = np.percentile(times, [25, 50, 75])
    spread = high / low if low > 0 else float("inf")
    return {"min_s": low, "median_s": statistics.median(times), "max_s": high, "iqr_s": float(q3 - q1),
            "spread": round(spread, 3), "noisy": bool(len(times) > 1 and spread > max_spread)}


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float | None:
    """The median over rounds of ``numerator[r] / denominator[r]``: a ratio taken within each
    round, so load that hits both calls of a round cancels."""
    pairs = [a / b for a, b in zip(numerator, denominator) if b > 0]
    return round(statistics.median(pairs), 3) if pairs else None


def attention_flops(kind: str, pass_name: str, *, batch: int, heads: int, length: int, head_dim: int,
                    chunk_length: int = 64, num_chunks_before: int = 1, num_chunks_after: int = 0,
                    num_hashes: int | None = None) -> int | None:
    """Floating-point operations of the attention matmuls, the rule of the GFLOP/s column.

    Forward: the two matmuls per query block, ``Q K^T`` and ``P V``, each ``2 * queries *
    keys * head_dim``, over every (batch, head) and, for LSH, every hash round. Full attention
    (``full``, ``native``) counts every query against every key (``4 * L^2 * head_dim``, the
    causal half included: what a dense kernel issues); LSH and local count each chunk of
    ``chunk_length`` queries against its window of ``(1 + before + after) * chunk_length``
    keys (``4 * L * window * head_dim`` per round; the whole length when it is one chunk).
    Forward+backward: 4x the forward (the backward's four matmuls, 2x, plus the recompute of
    the forward that a memory-lean backward does, 1x), the same count for every
    implementation so that rates compare as times do. Softmax, hashing, sorting and gathers
    are not counted. A training step has no count (None).
    """
    if kind == "train":
        return None
    rows = batch * heads
    if kind in ("full", "native"):
        forward = 4 * rows * length * length * head_dim
    elif kind in ("lsh", "local"):
        window = length if length <= chunk_length else (1 + num_chunks_before + num_chunks_after) * chunk_length
        rounds = (num_hashes or 1) if kind == "lsh" else 1
        forward = 4 * rows * rounds * length * window * head_dim
    else:
        return None
    return forward if pass_name == "forward" else 4 * forward


def projection_flops(pass_name: str, *, batch: int, length: int, d_model: int, width: int, outputs: int) -> int:
    """The input projections of a peer row: ``outputs`` matmuls ``(batch*L, d_model) x (d_model,
    width)``, 2 FLOPs per multiply-add; forward+backward 3x (two matmuls per weight in the
    backward, nothing to recompute)."""
    forward = 2 * batch * length * d_model * width * outputs
    return forward if pass_name == "forward" else 3 * forward


def matmul_rate(backend: Any, dtype: str, size: int | None = None, repeats: int = 3,
                clock: Callable[[], float] = time.perf_counter) -> dict:
    """GFLOP/s of a square ``size x size`` matmul on ``backend`` (the fastest of ``repeats`` after
    a warm-up: the rate the device attains, least disturbed by other load), the yardstick of the
    ``% matmul`` column. ``size``: 1024 on a CPU, 4096 on a GPU."""
    if size is None:
        size = 4096 if "gpu" in backend.capabilities else 1024
    rng = np.random.default_rng(0)
    try:
        a, b = (backend.from_numpy(rng.standard_normal((size, size)), dtype=dtype) for _ in range(2))
        matmul = backend.xp.matmul
        backend.synchronize(matmul(a, b))
        times = []
        for _ in range(repeats):
            start = clock()
            backend.synchronize(matmul(a, b))
            times.append(clock() - start)
    except Exception as error:  # e.g. a dtype the framework cannot multiply on this device
        return {"size": size, "dtype": dtype, "gflops": None, "error": f"{type(error).__name__}: {error}"}
    seconds = min(times)
    return {"size": size, "dtype": dtype, "seconds": seconds, "gflops": round(2 * size**3 / seconds / 1e9, 2),
            "median_gflops": round(2 * size**3 / statistics.median(times) / 1e9, 2)}


def best_rate(*measurements: dict) -> dict:
    """The measurement with the highest rate (the matmul is timed at the start and the end of a
    run; a burst of load during one of them does not lower the yardstick)."""
    valid = [m for m in measurements if m.get("gflops")]
    if not valid:
        return measurements[0]
    best = dict(max(valid, key=lambda m: m["gflops"]))
    best["measured"] = [m.get("gflops") for m in measurements]
    return best


def rates(flops: int | None, seconds: float | None, matmul_gflops: float | None) -> tuple[float | None, float | None]:
    """``(GFLOP/s, percent of the matmul rate)`` of a row, None where unknown."""
    if not flops or not seconds:
        return None, None
    gflops = flops / seconds / 1e9
    percent = 100 * gflops / matmul_gflops if matmul_gflops else None
    return round(gflops, 3), (None if percent is None else round(percent, 2))
