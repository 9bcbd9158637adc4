"""The ``reformer-core`` command: ``info`` (what is installed) and ``bench`` (LSH vs full attention).

Importing this module imports no framework; ``info`` imports only frameworks that are
installed (to list their devices), ``bench`` only the backends it is asked to run.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import sys
from importlib import metadata

__all__ = ["main"]

# name -> (framework module, pip extra); the registry in reformer_core.backend is the source,
# this is the fallback should its private layout change.
_FALLBACK_REGISTRY = {
    "numpy": ("numpy", None),
    "strict": ("array_api_strict", "test"),
    "torch": ("torch", "torch"),
    "jax": ("jax", "jax"),
    "cupy": ("cupy", "cupy"),
}


# ---------------------------------------------------------------- info


def _framework_and_extra(name: str) -> tuple[str, str | None]:
    from . import backend as backend_module

    entry = getattr(backend_module, "_REGISTRY", {}).get(name)
    if isinstance(entry, tuple) and len(entry) == 3:
        return entry[1], entry[2]
    return _FALLBACK_REGISTRY.get(name, (name, name))


@functools.lru_cache(maxsize=1)
def _distributions() -> dict:
    return metadata.packages_distributions()


def _framework_version(framework: str) -> str | None:
    """Installed version of a top-level module's distribution, read without importing it."""
    try:
        distributions = _distributions().get(framework) or [framework]
        return metadata.version(distributions[0])
    except (metadata.PackageNotFoundError, OSError, ValueError):
        return None


def _install_hint(framework: str, extra: str | None) -> str:
    return f"pip install 'reformer-core[{extra}]'" if extra else f"pip install {framework}"


def collect_info() -> dict:
    """Everything ``reformer-core info`` shows, as a JSON-ready dict."""
    import numpy as np

    from . import __version__
    from .backend import available_backends, known_backends, use_backend

    usable = set(available_backends())
    backends = []
    for name in known_backends():
        framework, extra = _framework_and_extra(name)
        installed = importlib.util.find_spec(framework) is not None  # finds, does not import
        entry = {
            "name": name,
            "framework": framework,
            "installed": installed,
            "framework_version": _framework_version(framework) if installed else None,
            "usable": False,
            "install": None if installed else _install_hint(framework, extra),
        }
        if installed and name not in usable:
            entry["note"] = f"{framework} is installed, but this version of reformer-core has no {name} adapter"
        elif installed:
            try:
                with use_backend(name) as backend:
                    entry.update(backend.describe())
                entry["usable"] = True
            except Exception as error:  # a broken install: report it, do not crash `info`
                entry["error"] = f"{type(error).__name__}: {error}"
        backends.append(entry)
    return {
        "reformer_core": __version__,
        "python": f"{platform.python_version()} ({platform.python_implementation()}) {sys.executable}",
        "numpy": np.__version__,
        "array_api_compat": _framework_version("array_api_compat"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "default_backend": os.environ.get("REFORMER_BACKEND") or "numpy",
        "backends": backends,
    }


def format_info(info: dict) -> str:
    from ._bench_report import short_device

    lines = [
        f"reformer-core     {info['reformer_core']}",
        f"python            {info['python']}",
        f"numpy             {info['numpy']}",
        f"array-api-compat  {info['array_api_compat']}",
        f"platform          {info['platform']}, {info['cpu_count']} CPUs",
        "",
        f"backends (default: {info['default_backend']}; choose with REFORMER_BACKEND or --backends):",
    ]
    for entry in info["backends"]:
        if entry["usable"]:
            status = "ready"
            version = f"{entry['framework']} {entry.get('version') or entry['framework_version']}"
            detail = "devices: " + ", ".join(short_device(d) for d in entry.get("devices", []))
        elif not entry["installed"]:
            status, version, detail = "not installed", "-", f"install: {entry['install']}"
        elif "error" in entry:
            status = "broken"
            version = f"{entry['framework']} {entry['framework_version']}"
            detail = entry["error"]
        else:
            status = "no adapter"
            version = f"{entry['framework']} {entry['framework_version']}"
            detail = entry.get("note", "")
        lines.append(f"  {entry['name']:<7} {status:<14} {version:<24} {detail}")
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


# ---------------------------------------------------------------- bench


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1024,2048, got {text!r}")
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _write_json(path: str, report: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")
    print(f"wrote {path}", file=sys.stderr)


def _cmd_bench_memory(args: argparse.Namespace) -> int:
    from ._bench import resolve_backends
    from ._memory import format_memory_report, memory_report

    try:
        backends = resolve_backends(args.backends)
        unsupported = [spec for spec in backends if spec.split(":")[0] not in ("numpy", "torch", "jax")]
        if unsupported:
            raise ValueError(f"--memory measures numpy, torch and jax; leave out {', '.join(unsupported)}")
        if args.lengths and len(args.lengths) != 1:
            raise ValueError("--memory takes one length (--lengths 4096)")
    except ValueError as error:
        print(f"reformer-core bench: error: {error}", file=sys.stderr)
        return 2
    report = memory_report(quick=args.quick, backends=backends, length=args.lengths[0] if args.lengths else None,
                           depths=args.depths)
    print(format_memory_report(report))
    if args.json:
        _write_json(args.json, report)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from .conformance.check import format_table, run_suite, summarise

    completed, rows = run_suite(args.backends, args.max_examples)
    summary = summarise(rows)
    print(format_table(summary) if summary else "no comparisons ran (are the selected backends installed?)")
    skipped = [line for line in completed.stdout.splitlines() if "SKIPPED" in line or "skipped" in line]
    tail = completed.stdout.strip().splitlines()[-1:] if completed.stdout.strip() else []
    for line in tail:
        print(f"pytest: {line}")
    if completed.returncode not in (0, 5):
        print(completed.stdout[-4000:], file=sys.stderr)
        print(completed.stderr[-2000:], file=sys.stderr)
    if args.json:
        _write_json(args.json, {"schema": "reformer-core-check/1", "backends": args.backends,
                                "max_examples": args.max_examples, "exit_code": completed.returncode,
                                "summary": summary, "skipped": skipped})
    failed = completed.returncode != 0 or any(e["failed"] for e in summary)
    return 1 if failed else 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import run_train_command

    return run_train_command(args)


def _cmd_bench(args: argparse.Namespace, argv: list[str]) -> int:
    from . import _bench
    from ._progress import Progress

    if args.memory:
        return _cmd_bench_memory(args)

    try:
        backends = _bench.resolve_backends(args.backends)
        figure = args.speed_figure
        if args.lengths:
            lengths = args.lengths
        else:
            lengths = _bench.SPEED_FIGURE_LENGTHS if figure else _bench.DEFAULT_LENGTHS
            lengths = lengths[:2] if args.quick else lengths
        settings = _bench.BenchSettings(
            backends=backends,
            lengths=lengths,
            num_hashes=args.hashes,
            include_full=not args.no_full,
            include_local=not (args.no_local or figure),
            include_train=not (args.no_train or figure),
            passes=("forward",) if (args.forward_only or figure) else _bench.PASSES,
            batch=args.batch,
            fixed_tokens=32768 if figure else None,
            heads=args.heads,
            head_dim=args.head_dim,
            chunk_length=args.chunk_length,
            causal=not args.no_causal,
            dtype=args.dtype,
            repeats=args.repeats or (1 if args.quick else 3),
            compile=not args.no_compile,
            measure_memory=not args.no_memory,
            memory_budget_gb=args.memory_budget_gb,
            time_budget_s=args.time_budget,
            seed=args.seed,
        )
    except ValueError as error:
        print(f"reformer-core bench: error: {error}", file=sys.stderr)
        return 2
    total = len(settings.lengths) * sum(len(m.passes(settings)) for spec in settings.backends
                                        for m in _bench.planned_methods(spec, settings))
    with Progress(total, label="bench", enabled=not args.no_progress) as progress:
        report = _bench.run_benchmark(settings, progress, argv=argv)
    print(_bench.format_report(report))
    if args.json:
        _write_json(args.json, report)
    if args.plot:
        from ._bench_report import plot_report

        try:
            plot_report(report, args.plot)
        except ValueError as error:
            print(f"reformer-core bench: error: {error}", file=sys.stderr)
            return 2
        print(f"wrote {args.plot}", file=sys.stderr)
    errors = [row for row in report["results"] if row["status"] == "error"]
    if errors:
        print(f"reformer-core bench: {len(errors)} configuration(s) failed; see the table", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reformer-core",
        description="The Reformer written once against the Python Array API: inspect, benchmark and train.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    info = commands.add_parser("info", help="list backends: installed or not, versions, devices, how to install")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")

    bench = commands.add_parser(
        "bench",
        help="time and measure memory of LSH attention (1-8 hashes) vs full attention",
        description=(
            "Forward time and peak memory of LSH attention with 1, 2, 4, 8 hashes versus full "
            "attention, per backend and sequence length (batch 1, 2 heads, head_dim 64, "
            "chunk_length 64, causal, float32 unless told otherwise)."
        ),
    )
    bench.add_argument("--backends", metavar="LIST",
                       help="comma-separated backends with optional devices, e.g. numpy,torch,torch:cuda,jax,jax:gpu,"
                            "cupy (default: the installed CPU backends among numpy, torch, jax)")
    bench.add_argument("--lengths", type=_int_list, metavar="LIST",
                       help="sequence lengths (default 1024..16384 doubling; --speed-figure: up to 32768; --quick: the first)")
    bench.add_argument("--hashes", type=_int_list, default=(1, 2, 4, 8), metavar="LIST",
                       help="LSH hash rounds to compare (default 1,2,4,8)")
    bench.add_argument("--no-full", action="store_true", help="leave out full attention")
    bench.add_argument("--repeats", type=int, metavar="N", help="timed calls per configuration; the median is reported (default 3; --quick: 1)")
    bench.add_argument("--quick", action="store_true", help="the first lengths only and 1 repeat (about 2 minutes on 2 cores)")
    bench.add_argument("--speed-figure", action="store_true",
                       help="the paper's Figure 5 (right): batch x length fixed at 32768 tokens, lengths 1K-32K, "
                            "full vs LSH-1/2/4/8, forward")
    bench.add_argument("--no-local", action="store_true", help="leave out local attention")
    bench.add_argument("--no-train", action="store_true", help="leave out the whole training step")
    bench.add_argument("--forward-only", action="store_true", help="no forward+backward pass")
    bench.add_argument("--no-compile", action="store_true",
                       help="run plain jax eagerly (it is jitted by default; a +jit spec such as torch+jit always compiles)")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG of time and memory against length (matplotlib)")
    bench.add_argument("--memory-budget-gb", type=_positive_float, default=8.0, metavar="GB",
                       help="skip a configuration whose estimated peak memory exceeds this (default 8)")
    bench.add_argument("--time-budget", type=_positive_float, metavar="SECONDS",
                       help="skip configurations once this much time is spent (or would be; default: none)")
    bench.add_argument("--no-memory", action="store_true", help="time only; skip the peak-memory run")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--heads", type=int, default=2)
    bench.add_argument("--head-dim", type=int, default=64)
    bench.add_argument("--chunk-length", type=int, default=64)
    bench.add_argument("--dtype", default="float32", choices=("float16", "bfloat16", "float32", "float64"))
    bench.add_argument("--no-causal", action="store_true", help="no causal mask (default: causal)")
    bench.add_argument("--seed", type=int, default=0, help="seed of inputs and rotations")
    bench.add_argument("--json", metavar="PATH", help="write the results, settings, versions and hardware as JSON")
    bench.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    bench.add_argument("--depths", type=_int_list, default=(2, 4, 8, 12), metavar="LIST",
                       help="with --memory: the stack depths to measure (default 2,4,8,12)")
    bench.add_argument("--memory", action="store_true",
                       help="instead: training-step memory against depth (2-12 layers, reversible vs storing "
                            "activations; L=4096, d_model 256, --quick: L=1024, d_model 64) on each of --backends, and "
                            "NumPy's feed-forward backward memory against length")

    check = commands.add_parser(
        "check",
        help="run the conformance suite: every installed backend against the float64 NumPy oracle",
        description="Runs `pytest --pyargs reformer_core.conformance` and prints, per backend, dtype and component, "
                    "the largest forward and gradient errors against the oracle, and pass/fail.",
    )
    check.add_argument("--backends", metavar="LIST",
                       help="comma-separated backend specs (default: every installed CPU backend), "
                            "e.g. numpy,strict,torch,torch:cuda,jax,jax:gpu,cupy,package.module:Adapter")
    check.add_argument("--max-examples", type=int, metavar="N", help="hypothesis examples per test (default 10)")
    check.add_argument("--json", metavar="PATH", help="write the summary as JSON")

    train = commands.add_parser(
        "train",
        help="train a small Reformer on the paper's duplication task (0 w 0 w) and evaluate with 1-8 hashes",
    )
    train.add_argument("--task", choices=("copy",), default="copy", help="the task (only 'copy' for now)")
    train.add_argument("--backend", default=None, help="backend name, e.g. numpy or strict:device1 (default: current)")
    train.add_argument("--length", type=int, default=128, help="sequence length, even (default 128)")
    train.add_argument("--steps", type=int, default=2000, help="optimiser steps (default 2000)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--batch", type=int, default=16)
    train.add_argument("--hashes", type=int, default=2, help="LSH hash rounds while training (default 2)")
    train.add_argument("--attention", choices=("lsh", "full", "local"), default="lsh",
                       help="attention used while training (default lsh)")
    train.add_argument("--chunk-length", type=int, default=16)
    train.add_argument("--d-model", type=int, default=128)
    train.add_argument("--learning-rate", type=float, default=2e-3)
    train.add_argument("--time-limit", type=float, metavar="SECONDS", help="stop training after this long")
    train.add_argument("--json", metavar="PATH", help="write final metrics and the learning curve as JSON")
    train.add_argument("--checkpoint", metavar="PATH", help="save the trained parameters here (.npz)")
    train.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``reformer-core`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            return _cmd_info(args)
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "check":
            return _cmd_check(args)
        return _cmd_bench(args, argv)
    except BrokenPipeError:  # `reformer-core bench | head`: stop quietly, as other shell tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
