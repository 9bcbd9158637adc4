"""What a benchmark run measures: :class:`BenchSettings`, the :class:`Method` rows, the budgets.

``BenchSettings`` (validated when made) names the backends, lengths, hash counts, passes and
shapes of a ``reformer-core bench`` run; its ``methods`` are the :class:`Method` rows (LSH with
each hash count, local, full, the framework's native full attention, a training step). A
configuration is skipped, not run, when :func:`estimate_peak_bytes` exceeds the memory budget
or when :func:`time_skip` finds the time budget spent (or about to be, judging by the same
method at a shorter length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .timing import DEFAULT_MAX_SPREAD

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (1024, 2048)
SPEED_FIGURE_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_HASHES = (1, 2, 4, 8)
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
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


def time_skip(method: Method, key: tuple, done: dict, length: int, settings: BenchSettings, remaining: float) -> bool:
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
