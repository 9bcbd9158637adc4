"""``reformer-core check``: run the suite on the selected backends and print a table of errors.

The suite runs in a pytest subprocess (so its hypothesis settings and module state stay out
of the caller); every comparison appends a JSON line to a results file, which becomes the
table: backend by component, the largest absolute and relative errors of forward results
and of gradients, and a pass/fail mark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from . import COMPONENT_NAMES
from .assertions import RESULTS_ENV

__all__ = ["run_suite", "summarise", "format_table"]


def run_suite(backends: str | None = None, max_examples: int | None = None, extra_args=(), quiet: bool = True,
              progress: bool = False):
    """Run the suite; returns ``(completed pytest process, rows)`` with one row per comparison.

    With ``progress``, the tests are counted first and each finished test is shown on stderr
    (throttled when stderr is not a terminal), as the run can take minutes.
    """
    with tempfile.TemporaryDirectory() as folder:
        results = os.path.join(folder, "results.jsonl")
        command = [sys.executable, "-m", "pytest", "--pyargs", "reformer_core.conformance", "-p", "no:cacheprovider",
                   "--tb=line", *extra_args]
        if backends:
            command += ["--backends", backends]
        if max_examples:
            command += ["--max-examples", str(max_examples)]
        env = {**os.environ, RESULTS_ENV: results}
        if progress:
            completed = _run_with_progress(command, env)
        else:
            completed = subprocess.run([*command, "-q" if quiet else "-v"], env=env, text=True, capture_output=True)
        rows = []
        if os.path.exists(results):
            with open(results, encoding="utf-8") as handle:
                rows = [json.loads(line) for line in handle if line.strip()]
    return completed, rows


_OUTCOMES = (" PASSED", " FAILED", " SKIPPED", " ERROR", " XFAIL", " XPASS")


def _run_with_progress(command: list, env: dict) -> subprocess.CompletedProcess:
    """``pytest -v`` with its per-test lines counted on a progress display."""
    from reformer_core._progress import Progress

    collected = subprocess.run([*command, "--collect-only", "-q"], env=env, text=True, capture_output=True)
    total = sum(1 for line in collected.stdout.splitlines() if "::" in line)
    lines = []
    with Progress(total, label="check") as shown:
        with subprocess.Popen([*command, "-v"], env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) as process:
            for line in process.stdout:
                lines.append(line)
                if "::" in line and any(outcome in line for outcome in _OUTCOMES):
                    test = line.split(" ", 1)[0].rsplit("/", 1)[-1]
                    outcome = next(o for o in _OUTCOMES if o in line).strip().lower()
                    shown.step(f"{test} {outcome}")
            stderr = process.stderr.read()
    return subprocess.CompletedProcess(process.args, process.returncode, "".join(lines), stderr)


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (backend, dtype, component): worst errors forward and gradient, and pass/fail."""
    table: dict[tuple, dict] = {}
    for row in rows:
        key = (row["backend"], row["dtype"], row["component"])
        entry = table.setdefault(key, {"backend": row["backend"], "dtype": row["dtype"], "component": row["component"],
                                       "device": row["device"], "checks": 0, "failed": 0,
                                       "forward_abs": 0.0, "forward_rel": 0.0, "grad_abs": 0.0, "grad_rel": 0.0})
        entry["checks"] += 1
        entry["failed"] += 0 if row["passed"] else 1
        if row["quantity"] in ("buckets", "perm", "undo"):
            prefix = "forward"
        else:
            prefix = "grad" if row["kind"] == "grad" else "forward"
        entry[f"{prefix}_abs"] = max(entry[f"{prefix}_abs"], row["max_abs"])
        entry[f"{prefix}_rel"] = max(entry[f"{prefix}_rel"], row["max_rel"])
    order = {name: i for i, name in enumerate(COMPONENT_NAMES)}
    return sorted(table.values(), key=lambda e: (e["backend"], e["dtype"], order.get(e["component"], 99)))


def format_table(summary: list[dict]) -> str:
    header = (f"{'backend':<14} {'dtype':<9} {'component':<16} {'checks':>6}  "
              f"{'fwd max abs':>11} {'fwd max rel':>11}  {'grad max abs':>12} {'grad max rel':>12}  result")
    lines = [header, "-" * len(header)]
    for e in summary:
        exact = e["component"] in ("hashing", "sorting")
        fwd = (f"{'exact':>11} {'':>11}" if exact and not e["failed"]
               else f"{e['forward_abs']:>11.2e} {e['forward_rel']:>11.2e}")
        grad = f"{'-':>12} {'-':>12}" if exact else f"{e['grad_abs']:>12.2e} {e['grad_rel']:>12.2e}"
        mark = "pass" if not e["failed"] else f"FAIL ({e['failed']})"
        lines.append(f"{e['backend']:<14} {e['dtype']:<9} {e['component']:<16} {e['checks']:>6}  {fwd}  {grad}  {mark}")
    return "\n".join(lines)
