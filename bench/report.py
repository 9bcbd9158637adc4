"""Rendering ``reformer-core bench`` results: terminal tables, the speed-figure summary, PNG plots."""

from __future__ import annotations

from reformer_core.cli import short_device

__all__ = ["format_report", "format_seconds", "format_bytes", "speed_figure_summary", "plot_report"]


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


def _columns(report: dict) -> list[tuple[dict, str]]:
    return [(m, p) for m in report["methods"] for p in (("step",) if m["kind"] == "train" else report["settings"]["passes"])]


def _title(method: dict, pass_name: str) -> str:
    name = {"lsh": f"lsh x{method['num_hashes']}", "train": "train step"}.get(method["kind"], method["kind"])
    return name if pass_name in ("step", "forward") else f"{name} +bwd"


def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] == "ok":
        memory = "" if row["peak_memory_bytes"] is None else f" {format_bytes(row['peak_memory_bytes'])}"
        return f"{format_seconds(row['time_s'])}{memory}"
    return "error" if row["status"] == "error" else row["status"].replace("skipped: ", "skip ")


def _blocks(report: dict) -> list[tuple[str, list[tuple[dict, str]]]]:
    """Table blocks: forward (with the training step), then forward+backward."""
    columns = _columns(report)
    forward = [(m, p) for m, p in columns if p in ("forward", "step")]
    backward = [(m, p) for m, p in columns if p == "backward"]
    return [(title, cols) for title, cols in (("forward", forward), ("fwd+bwd", backward)) if cols]


def format_report(report: dict) -> str:
    """Per backend and pass: time (median) and peak memory per method and length; then time
    ratios against the shortest length, and the first call's time (warm-up and compilation)."""
    settings = report["settings"]
    lengths = settings["lengths"]
    first = lengths[0]
    by_key = {(r["backend"], r["method"], r["pass"], r["length"]): r for r in report["results"]}
    lines = []
    for backend_name, described in report["backends"].items():
        batch = f"batch {settings['fixed_tokens']}//L" if settings.get("fixed_tokens") else f"batch {settings['batch']}"
        lines.append(
            f"{backend_name} {described.get('version', '')} on {short_device(described.get('device', '?'))}: "
            f"{batch}, heads {settings['heads']}, head_dim {settings['head_dim']}, chunk_length "
            f"{settings['chunk_length']}, {'causal' if settings['causal'] else 'not causal'}, {settings['dtype']}")
        kinds = sorted({r["memory_kind"] for r in report["results"] if r["backend"] == backend_name and r["memory_kind"]})
        lines.append(f"time: median of {settings['repeats']} after warm-up; memory: peak of one call"
                     f"{' (' + ', '.join(kinds) + ')' if kinds else ''}; ratio: time over L={first}; "
                     f"first: the first call at L={first} (warm-up, compilation)")
        notes = set()
        ran = {(r["method"], r["pass"]) for r in report["results"] if r["backend"] == backend_name}
        for title, all_columns in _blocks(report):
            columns = [(m, p) for m, p in all_columns if (m["name"], p) in ran]  # e.g. no native kernel here
            if not columns:
                continue
            width = 22
            lines.append(f"{title:<8}" + "".join(f"  {_title(m, p).replace(' +bwd', ''):>{width}}" for m, p in columns))
            for length in lengths:
                cells = []
                for method, pass_name in columns:
                    row = by_key.get((backend_name, method["name"], pass_name, length))
                    text = _cell(row)
                    if row is not None and row.get("time_vs_first") is not None and length != first:
                        text += f" {row['time_vs_first']:.1f}x"
                    cells.append(text)
                    if row is not None and row["status"] == "error":
                        notes.add(f"error at L={length} {_title(method, pass_name)}: {row.get('error', '')}")
                lines.append(f"{length:>8}" + "".join(f"  {c:>{width}}" for c in cells))
            cells = [format_seconds(by_key.get((backend_name, m["name"], p, first), {}).get("first_call_s"))
                     for m, p in columns]
            lines.append(f"{'first':>8}" + "".join(f"  {c:>{width}}" for c in cells))
        lines += [f"  {note}" for note in sorted(notes)]
        lines.append("")
    if settings.get("fixed_tokens"):
        lines += speed_figure_summary(report)
    if any(r["status"] == "skipped: memory" for r in report["results"]):
        lines.append(f"skip memory = estimated peak above --memory-budget-gb {settings['memory_budget_gb']:g}")
    if any(r["status"] == "skipped: time" for r in report["results"]):
        lines.append(f"skip time = --time-budget {settings['time_budget_s']:g} s ran out")
    lines.append(f"total {format_seconds(report.get('elapsed_s'))}")
    return "\n".join(lines)


def speed_figure_summary(report: dict) -> list[str]:
    """The paper's claim at fixed tokens: LSH stays flat with length, full attention grows."""
    lines = [f"speed figure ({report['settings']['fixed_tokens']} tokens per step): time at the longest measured "
             f"length over the shortest, and LSH's max/min over all lengths (flat = 1.0)"]
    for backend_name in report["backends"]:
        parts = []
        for method in report["methods"]:
            if method["kind"] not in ("lsh", "full"):
                continue
            rows = sorted((r for r in report["results"] if r["backend"] == backend_name and r["method"] == method["name"]
                           and r["pass"] == "forward" and r["status"] == "ok"), key=lambda r: r["length"])
            if len(rows) < 2:
                continue
            times = [r["time_s"] for r in rows]
            growth = times[-1] / times[0]
            text = f"{method['name']} {growth:.2f}x ({rows[0]['length']}->{rows[-1]['length']})"
            if method["kind"] == "lsh":
                text += f", max/min {max(times) / min(times):.2f}"
            parts.append(text)
        lines.append(f"  {backend_name}: " + "; ".join(parts))
    return lines


def plot_report(report: dict, path: str) -> None:
    """Time and peak memory against length, one line per backend, method and pass (log-log PNG)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'reformer-core[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(13, 5))
    styles = ["-", "--", ":", "-."]
    for b, backend_name in enumerate(report["backends"]):
        for method, pass_name in _columns(report):
            rows = sorted((r for r in report["results"] if r["backend"] == backend_name and r["method"] == method["name"]
                           and r["pass"] == pass_name and r["status"] == "ok"), key=lambda r: r["length"])
            if not rows:
                continue
            label = f"{backend_name} {_title(method, pass_name)}"
            lengths = [r["length"] for r in rows]
            ax_time.plot(lengths, [r["time_s"] for r in rows], styles[b % 4], marker="o", label=label)
            memory = [(r["length"], r["peak_memory_bytes"]) for r in rows if r["peak_memory_bytes"]]
            if memory:
                ax_mem.plot([m[0] for m in memory], [m[1] / 2**20 for m in memory], styles[b % 4], marker="o",
                            label=label)
    tokens = report["settings"].get("fixed_tokens")
    ax_time.set_title(f"time per call ({tokens} tokens per step)" if tokens else "time per call")
    ax_mem.set_title("peak memory per call")
    for ax, unit in ((ax_time, "seconds"), (ax_mem, "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
