"""``reformer-core check``: its arguments and how it runs (the suite runs in :mod:`.check`)."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from reformer_core.cli import write_json

from .check import format_table, run_suite, summarise
from .targets import parse_specs, spec_errors

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Runs `pytest --pyargs reformer_core.conformance` and prints, per backend, dtype and "
                          "component, the largest forward and gradient errors against the oracle, and pass/fail.")
    parser.add_argument("--backends", metavar="LIST",
                        help="comma-separated backend specs (default: every installed CPU backend), "
                             "e.g. numpy,strict,torch,torch:cuda,jax,jax:gpu,cupy,package.module:Adapter")
    parser.add_argument("--max-examples", type=int, metavar="N", help="hypothesis examples per test (default 10)")
    parser.add_argument("--json", metavar="PATH", help="write the summary as JSON")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """``reformer-core check``.

    Exit status: 0 when every comparison passed; 1 when one failed (or pytest did); 2 before
    running anything when a backend asked for by name is unknown, not installed or not a
    loadable adapter, and 2 when no comparison ran at all (every target skipped, e.g.
    ``--backends torch:cuda`` without a GPU). A target that cannot run here beside others
    that can is skipped, and the reason printed.
    """
    missing = [name for name in ("pytest", "hypothesis") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"reformer-core check: error: the conformance suite needs {' and '.join(missing)}, which "
              f"{'is' if len(missing) == 1 else 'are'} not installed; pip install 'reformer-core[test]'",
              file=sys.stderr)
        return 2
    errors = spec_errors(parse_specs(args.backends))
    if errors:
        for error in errors:
            print(f"reformer-core check: error: {error}", file=sys.stderr)
        return 2
    completed, rows = run_suite(args.backends, args.max_examples, extra_args=("-rs",), progress=True)
    summary = summarise(rows)
    print(format_table(summary) if summary else "no comparisons ran: every selected target was skipped")
    skipped = [line for line in completed.stdout.splitlines() if "SKIPPED" in line or "skipped" in line]
    reasons = sorted({line.split(": ", 1)[-1] for line in completed.stdout.splitlines() if line.startswith("SKIPPED")})
    for reason in reasons:
        print(f"skipped: {reason}")
    tail = completed.stdout.strip().splitlines()[-1:] if completed.stdout.strip() else []
    for line in tail:
        print(f"pytest: {line}")
    if completed.returncode not in (0, 5):
        print(completed.stdout[-4000:], file=sys.stderr)
        print(completed.stderr[-2000:], file=sys.stderr)
    if args.json:
        write_json(args.json, {"schema": "reformer-core-check/1", "backends": args.backends,
                               "max_examples": args.max_examples, "exit_code": completed.returncode,
                               "summary": summary, "skipped": skipped})
    failed = completed.returncode not in (0, 5) or any(e["failed"] for e in summary)
    if failed:
        return 1
    if not summary:
        print("reformer-core check: error: no comparisons ran; select a backend that can run here "
              "(reformer-core info lists them)", file=sys.stderr)
        return 2
    return 0
