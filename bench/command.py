"""``reformer-core bench``: its arguments and how it runs (the harness is :mod:`.harness`)."""

from __future__ import annotations

import argparse
import sys

from reformer_core._progress import Progress
from reformer_core.cli import int_list, positive_float, write_json

from . import harness
from .depth import format_memory_report, memory_report, memory_rows
from .report import format_report, plot_memory_report, plot_report, require_matplotlib
from .threads import prepare_jax, usable_cpus
from .timing import DEFAULT_MAX_SPREAD

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Forward time and peak memory of LSH attention with 1, 2, 4, 8 hashes versus full "
        "attention, per backend and sequence length (batch 1, 2 heads, head_dim 64, "
        "chunk_length 64, causal, float32 unless told otherwise)."
    )
    parser.add_argument("--backends", metavar="LIST",
                       help="comma-separated backends with optional devices, e.g. numpy,torch,torch:cuda,jax,jax:gpu,"
                            "cupy (default: the installed CPU backends among numpy, torch, jax); suffix +jit compiles, "
                            "+standard runs without native kernels (reformer_core.standard_path()), e.g. "
                            "torch+standard; a device that is not here (torch:cuda without a GPU) is skipped with its "
                            "reason")
    parser.add_argument("--lengths", type=int_list, metavar="LIST",
                       help="sequence lengths (default 1024..16384 doubling; --speed-figure: up to 32768; --quick: the first)")
    parser.add_argument("--hashes", type=int_list, metavar="LIST",
                       help="LSH hash rounds to compare (default 1,2,4,8; --quick: 1,2,4)")
    parser.add_argument("--no-full", action="store_true", help="leave out full attention")
    parser.add_argument("--repeats", type=int, metavar="N",
                       help="timed calls per row, alternating the rows of each length and pass (A B A B); min, median "
                            "and max are reported (default 3, also with --quick)")
    parser.add_argument("--quick", action="store_true",
                       help="shorter sizes, same repeats: lengths 512 and 1024 (--speed-figure: 1K, 2K), LSH with 1 and "
                            "2 hashes unless --hashes (121 s and 212 s measured on 2 shared CPU cores at load average 3-4, "
                            "with numpy, torch, jax and the peers)")
    parser.add_argument("--threads", type=int, metavar="N",
                       help="threads of every framework (BLAS via threadpoolctl, torch.set_num_threads, XLA_FLAGS "
                            "before JAX starts); default: the cores available to this process")
    parser.add_argument("--max-spread", type=positive_float, default=DEFAULT_MAX_SPREAD, metavar="RATIO",
                       help=f"flag rows whose slowest timed call took over RATIO times the fastest (default "
                            f"{DEFAULT_MAX_SPREAD:g})")
    parser.add_argument("--no-peers", action="store_true",
                       help="leave out the peer rows (reformer-core, HF transformers, reformer-pytorch, torch SDPA, "
                            "with projections) that run beside torch when installed")
    parser.add_argument("--speed-figure", action="store_true",
                       help="the paper's Figure 5 (right): batch x length fixed at 32768 tokens, lengths 1K-32K, "
                            "full vs LSH-1/2/4/8, forward")
    parser.add_argument("--no-local", action="store_true", help="leave out local attention")
    parser.add_argument("--no-train", action="store_true", help="leave out the whole training step")
    parser.add_argument("--forward-only", action="store_true", help="no forward+backward pass")
    parser.add_argument("--no-compile", action="store_true",
                       help="run plain jax eagerly (it is jitted by default; a +jit spec such as torch+jit always compiles)")
    parser.add_argument("--plot", metavar="PATH",
                       help="write a PNG: time and memory against length, one panel per attention kind (with "
                            "--memory: memory against depth); needs matplotlib, checked before any work")
    parser.add_argument("--memory-budget-gb", type=positive_float, default=8.0, metavar="GB",
                       help="skip a configuration whose estimated peak memory exceeds this (default 8)")
    parser.add_argument("--time-budget", type=positive_float, metavar="SECONDS",
                       help="skip configurations once this much time is spent (or would be; default: none)")
    parser.add_argument("--no-memory", action="store_true", help="time only; skip the peak-memory run")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk-length", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float16", "bfloat16", "float32", "float64"))
    parser.add_argument("--no-causal", action="store_true", help="no causal mask (default: causal)")
    parser.add_argument("--seed", type=int, default=0, help="seed of inputs and rotations")
    parser.add_argument("--json", metavar="PATH", help="write the results, settings, versions and hardware as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--depths", type=int_list, default=(2, 4, 8, 12), metavar="LIST",
                       help="with --memory: the stack depths to measure (default 2,4,8,12)")
    parser.add_argument("--memory", action="store_true",
                       help="instead: training-step memory against depth (2-12 layers, reversible vs storing "
                            "activations; L=4096, d_model 256, --quick: L=1024, d_model 64) on each of --backends, and "
                            "NumPy's feed-forward backward memory against length")


QUICK_LENGTHS = (512, 1024)
QUICK_HASHES = (1, 2)


def _error(error: Exception) -> int:
    print(f"reformer-core bench: error: {error}", file=sys.stderr)
    return 2


def _prepare(args: argparse.Namespace) -> tuple[tuple[str, ...], dict[str, str], int]:
    """Before any work: matplotlib for --plot, the thread count (XLA_FLAGS before JAX is
    imported), and the backend specs to run, skipping a device that is not here."""
    if args.plot:
        require_matplotlib()
    threads = args.threads if args.threads is not None else usable_cpus()
    if threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {threads}")
    if args.backends is None or "jax" in args.backends.lower() or args.backends.strip() == "all":
        prepare_jax(threads)
    backends, skipped = harness.bench_targets(args.backends)
    for name, reason in skipped.items():
        print(f"reformer-core bench: skipping {name}: {reason}", file=sys.stderr)
    return backends, skipped, threads


def _run_memory(args: argparse.Namespace) -> int:
    try:
        backends, skipped, threads = _prepare(args)
        if args.lengths and len(args.lengths) != 1:
            raise ValueError("--memory takes one length (--lengths 4096)")
        from .threads import pinned_threads

        total = memory_rows(backends=backends, depths=args.depths, quick=args.quick)
        with pinned_threads(threads) as thread_info, \
                Progress(total, label="bench --memory", enabled=not args.no_progress) as progress:
            report = memory_report(quick=args.quick, backends=backends,
                                   length=args.lengths[0] if args.lengths else None, depths=args.depths,
                                   progress=progress)
        report["threads"] = thread_info
        report["skipped_backends"] = skipped
    except ValueError as error:  # a backend without a memory probe says so (Backend.training_step_memory)
        return _error(error)
    print(format_memory_report(report))
    for name, reason in skipped.items():
        print(f"skipped backend {name}: {reason}")
    if args.json:
        write_json(args.json, report)
    if args.plot:
        plot_memory_report(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """``reformer-core bench``."""
    if args.memory:
        return _run_memory(args)

    try:
        backends, skipped, threads = _prepare(args)
        figure = args.speed_figure
        if args.lengths:
            lengths = args.lengths
        elif args.quick:
            lengths = harness.SPEED_FIGURE_LENGTHS[:2] if figure else QUICK_LENGTHS
        else:
            lengths = harness.SPEED_FIGURE_LENGTHS if figure else harness.DEFAULT_LENGTHS
        hashes = args.hashes or (QUICK_HASHES if args.quick else harness.DEFAULT_HASHES)
        settings = harness.BenchSettings(
            backends=backends,
            lengths=lengths,
            num_hashes=hashes,
            include_full=not args.no_full,
            include_local=not (args.no_local or figure),
            include_train=not (args.no_train or figure),
            passes=("forward",) if (args.forward_only or figure) else harness.PASSES,
            batch=args.batch,
            fixed_tokens=32768 if figure else None,
            heads=args.heads,
            head_dim=args.head_dim,
            chunk_length=args.chunk_length,
            causal=not args.no_causal,
            dtype=args.dtype,
            repeats=args.repeats or 3,
            compile=not args.no_compile,
            measure_memory=not args.no_memory,
            memory_budget_gb=args.memory_budget_gb,
            time_budget_s=args.time_budget,
            seed=args.seed,
            threads=threads,
            max_spread=args.max_spread,
            peers=not (args.no_peers or figure),
        )
        total = len(settings.lengths) * len(harness.planned_targets(settings))
    except ValueError as error:
        return _error(error)
    with Progress(total, label="bench", enabled=not args.no_progress) as progress:
        report = harness.run_benchmark(settings, progress, argv=argv, skipped_backends=skipped)
    print(format_report(report))
    if args.json:
        write_json(args.json, report)
    if args.plot:
        try:
            plot_report(report, args.plot)
        except ValueError as error:
            return _error(error)
        print(f"wrote {args.plot}", file=sys.stderr)
    errors = [row for row in report["results"] if row["status"] == "error"]
    if errors:
        print(f"reformer-core bench: {len(errors)} configuration(s) failed; see the table", file=sys.stderr)
        return 1
    return 0
