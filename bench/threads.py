"""Thread counts for benchmarks: pin every framework to ``--threads N``, warn of oversubscription.

* NumPy's BLAS (and any other BLAS/OpenMP pool loaded, torch's included) through
  ``threadpoolctl.threadpool_limits`` when threadpoolctl is installed: a runtime limit for the
  duration of the run; no environment variable is set or changed.
* torch: ``torch.set_num_threads(N)`` (intra-op threads; the inter-op pool is left alone: torch
  allows setting it only before its first parallel work), restored afterwards.
* JAX: XLA sizes its CPU thread pools when its backend starts, from ``XLA_FLAGS`` read at that
  moment; nothing can change them later. For N below the usable cores ``prepare_jax`` puts
  ``--xla_cpu_multi_thread_eigen=(N>1) intra_op_parallelism_threads=N`` in front of this
  process's ``XLA_FLAGS`` when JAX is not imported yet (N at or above the cores is XLA's
  default, so nothing is set); when JAX is imported already, or when
  ``XLA_FLAGS`` already sets a thread count, JAX keeps its own and the report says so.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

__all__ = ["usable_cpus", "prepare_jax", "pinned_threads", "oversubscription_warnings", "load_average"]

_JAX_NOTE: dict = {"pinned": False, "note": "jax not used"}


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average, None where the system has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def prepare_jax(threads: int) -> dict:
    """Ask XLA for ``threads`` CPU threads, which works only before JAX is imported."""
    global _JAX_NOTE
    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" in sys.modules or "jaxlib" in sys.modules:
        _JAX_NOTE = {"pinned": False, "note": "jax was imported before the bench: XLA keeps its thread pools "
                                              "(XLA_FLAGS are read when JAX starts)"}
    elif "intra_op_parallelism_threads" in flags or "xla_cpu_multi_thread_eigen" in flags:
        _JAX_NOTE = {"pinned": False, "note": f"XLA_FLAGS already set by the user: {flags!r}"}
    elif threads >= usable_cpus():
        _JAX_NOTE = {"pinned": True, "threads": threads, "note": "XLA's default: one thread per usable core"}
    else:
        # XLA_FLAGS must start with "--" (otherwise XLA reads it as a file name of flags)
        eigen = "false" if threads == 1 else "true"
        added = f"--xla_cpu_multi_thread_eigen={eigen} intra_op_parallelism_threads={threads}"
        os.environ["XLA_FLAGS"] = f"{added} {flags}".strip()
        _JAX_NOTE = {"pinned": True, "threads": threads, "note": f"XLA_FLAGS += {added!r} before import"}
    return dict(_JAX_NOTE)


def _pools() -> list[dict] | None:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [{"user_api": p.get("user_api"), "internal_api": p.get("internal_api"), "num_threads": p.get("num_threads"),
             "filepath": os.path.basename(p.get("filepath") or "")} for p in threadpool_info()]


@contextlib.contextmanager
def pinned_threads(threads: int) -> Iterator[dict]:
    """Limit every loaded framework to ``threads`` threads inside the block; yields what was set,
    for the report (``"threads"``)."""
    info: dict = {"requested": threads, "usable_cpus": usable_cpus(), "pools_before": _pools()}
    with contextlib.ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            info["blas"] = "not pinned: threadpoolctl is not installed (pip install threadpoolctl)"
        else:
            stack.enter_context(threadpool_limits(limits=threads))
            info["blas"] = threads
        torch = sys.modules.get("torch")
        if torch is not None and hasattr(torch, "set_num_threads"):
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            stack.callback(torch.set_num_threads, before)
            info["torch"] = {"intra_op": torch.get_num_threads(), "before": before,
                             "inter_op": torch.get_num_interop_threads()}
        info["jax"] = dict(_JAX_NOTE) if "jax" in sys.modules else {"pinned": False, "note": "jax not used"}
        info["pools"] = _pools()
        yield info


def oversubscription_warnings(threads: int, pools: list[dict] | None = None, load: float | None = None,
                              cores: int | None = None) -> list[str]:
    """Why timings may be noisy here: the load average above the cores, threads beyond the
    cores, or a thread pool larger than the cores (``pools`` as ``threadpool_info`` lists them)."""
    cores = usable_cpus() if cores is None else cores
    load = load_average() if load is None else load
    warnings = []
    if threads > cores:
        warnings.append(f"--threads {threads} is more than the {cores} usable cores: threads will compete")
    if load is not None and load > cores:
        warnings.append(f"the 1-minute load average {load:.2f} is above the {cores} usable cores: other processes "
                        f"compete for the CPU and timings will be noisy (see the spread column)")
    elif load is not None and threads + round(load) > cores:
        warnings.append(f"other processes keep about {round(load)} of the {cores} cores busy (load {load:.2f}); "
                        f"with {threads} threads the machine is oversubscribed: consider --threads "
                        f"{max(1, cores - round(load))} or an idle machine")
    for pool in pools or ():
        count = pool.get("num_threads") or 0
        if count > cores:
            warnings.append(f"{pool.get('internal_api')} ({pool.get('filepath')}) runs {count} threads on {cores} "
                            f"cores")
    return warnings
