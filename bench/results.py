"""The report's shared parts: its schema, the environment block, and the figures derived from rows.

:func:`environment` records versions and hardware (importing no framework); :func:`rate_key`
names the matmul yardstick of a row's device and dtype; :func:`same_round_speedups` and
:func:`add_ratios` fill in the columns computed from other rows (the speedup against a
reference row over the same rounds, each value against the shortest length's).
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

import numpy as np

from reformer_core import __version__

from .settings import BenchSettings
from .targets import Target
from .timing import paired_ratio

SCHEMA = "reformer-core.bench/3"


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


def rate_key(target: Target, settings: BenchSettings) -> str:
    return f"{target.backend.name}:{target.backend.device}:{settings.dtype}"


def same_round_speedups(group: list[Target], rows: list[dict]) -> None:
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


def add_ratios(report: dict) -> None:
    """``time_vs_first`` / ``memory_vs_first``: each value over the same method's at the shortest length."""
    first_length = report["settings"]["lengths"][0]
    firsts = {(r["backend"], r["method"], r["pass"]): r for r in report["results"]
              if r["length"] == first_length and r["status"] == "ok"}
    for row in report["results"]:
        first = firsts.get((row["backend"], row["method"], row["pass"]))
        for key, out in (("time_s", "time_vs_first"), ("peak_memory_bytes", "memory_vs_first")):
            ok = first is not None and row["status"] == "ok" and row[key] is not None and first[key]
            row[out] = round(row[key] / first[key], 3) if ok else None
