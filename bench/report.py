"""Rendering ``reformer-core bench`` results: terminal tables, the speed-figure summary, PNG plots."""

from __future__ import annotations

from reformer_core.cli import short_device

__all__ = ["format_report", "format_seconds", "format_bytes", "speed_figure_summary", "plot_report",
           "plot_memory_report", "require_matplotlib", "method_title"]


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


PASS_TITLES = {"forward": "forward", "backward": "fwd+bwd", "step": "step"}
_PASS_ORDER = {"forward": 0, "backward": 1, "step": 2}


def method_title(method: dict) -> str:
    """``lsh x4``, ``local``, ``full``, ``native full``, ``train step``."""
    return {"lsh": f"lsh x{method.get('num_hashes')}", "train": "train step",
            "native": "native full"}.get(method["kind"], method["kind"])


def _columns(report: dict) -> list[tuple[dict, str]]:
    return [(m, p) for m in report["methods"] for p in (("step",) if m["kind"] == "train" else report["settings"]["passes"])]


def _title(method: dict, pass_name: str) -> str:
    name = method_title(method)
    return name if pass_name in ("step", "forward") else f"{name} +bwd"


def _status_text(row: dict) -> str:
    return "error" if row["status"] == "error" else row["status"].replace("skipped: ", "skip ")


def _rate_line(report: dict, described: dict) -> str:
    for key, rate in report.get("matmul", {}).items():
        if described.get("peer") or rate.get("gflops") is None:
            continue
        name, _, rest = key.partition(":")
        if name == described.get("backend") and rest.rpartition(":")[0] == str(described.get("device")):
            return f"; matmul {rate['size']}^2 {rate['dtype']}: {rate['gflops']:.1f} GFLOP/s"
    return ""


_HEADER = (f"{'length':>7}  {'method':<11} {'pass':<8}{'median':>9} {'min':>9} {'max':>9} {'spread':>7} "
           f"{'GFLOP/s':>8} {'%mm':>6} {'memory':>9} {'speedup':>8} {'vs L0':>6} {'first':>9}")


def _row_line(row: dict, method: dict, first_length: int) -> str:
    head = f"{row['length']:>7}  {method_title(method):<11} {PASS_TITLES.get(row['pass'], row['pass']):<8}"
    if row["status"] != "ok":
        return head + f"{_status_text(row):>9}"
    spread = "-" if row.get("spread") is None else f"{row['spread']:.2f}" + ("!" if row.get("noisy") else " ")
    gflops = "-" if row.get("gflops") is None else f"{row['gflops']:.2f}" if row["gflops"] < 100 else f"{row['gflops']:.0f}"
    percent = "-" if row.get("matmul_pct") is None else f"{row['matmul_pct']:.1f}%"
    speedup = "-" if row.get("speedup") is None else f"{row['speedup']:.2f}x"
    vs_first = "-" if row.get("time_vs_first") is None or row["length"] == first_length else f"{row['time_vs_first']:.1f}x"
    memory = "-" if row.get("peak_memory_bytes") is None else format_bytes(row["peak_memory_bytes"])
    return (head + f"{format_seconds(row['time_s']):>9} {format_seconds(row.get('min_s')):>9} "
            f"{format_seconds(row.get('max_s')):>9} {spread:>7} {gflops:>8} {percent:>6} {memory:>9} {speedup:>8} "
            f"{vs_first:>6} {format_seconds(row.get('first_call_s')):>9}")


def format_report(report: dict) -> str:
    """Per backend (and peer): one line per length, method and pass with the median, min and max
    of the timed calls, their spread (max/min, '!' above the threshold), GFLOP/s and its share of
    the matmul rate, peak memory, the speedup over a reference taken within the same rounds,
    the time against the shortest length, and the first call (warm-up, compilation)."""
    settings = report["settings"]
    lengths = settings["lengths"]
    first = lengths[0]
    methods = {m["name"]: m for m in report["methods"]}
    order = {m["name"]: i for i, m in enumerate(report["methods"])}
    batch = f"batch {settings['fixed_tokens']}//L" if settings.get("fixed_tokens") else f"batch {settings['batch']}"
    shapes = (f"{batch}, heads {settings['heads']}, head_dim {settings['head_dim']}, chunk_length "
              f"{settings['chunk_length']}, {'causal' if settings['causal'] else 'not causal'}, {settings['dtype']}")
    threads = settings.get("threads")
    lines = [f"timed: {settings['repeats']} calls per row after warm-up, alternating the rows of each length and "
             f"pass (A B A B); median, min, max; spread = max/min ('!' above {settings.get('max_spread', 1.5):g}); "
             f"threads: {threads}",
             "GFLOP/s: attention matmuls (fwd+bwd = 4x forward; peers add the projections) over the median; "
             "%mm: of the square-matmul rate measured in this run on the same device; memory: peak of one call", ""]
    notes = []
    for backend_name, described in report["backends"].items():
        rows = sorted((r for r in report["results"] if r["backend"] == backend_name),
                      key=lambda r: (r["length"], _PASS_ORDER.get(r["pass"], 9), order.get(r["method"], 99)))
        if not rows:
            continue
        if described.get("peer"):
            lines.append(f"{backend_name} {described.get('version') or ''} (peer, beside "
                         f"{described.get('runs_beside')}) on {short_device(described.get('device', '?'))}: {shapes}, "
                         f"with the input projections from hidden; speedup: HF's layer's time over this row's")
        else:
            path = "; standard path" if described.get("standard_path") else ""
            lines.append(f"{backend_name} {described.get('version', '')} on {short_device(described.get('device', '?'))}: "
                         f"{shapes}{path}{_rate_line(report, described)}; speedup: the same backend's full attention's "
                         f"time over this row's")
        kinds = sorted({r["memory_kind"] for r in rows if r.get("memory_kind")})
        if kinds:
            lines.append(f"memory: {', '.join(kinds)}")
        lines.append(_HEADER)
        for row in rows:
            lines.append(_row_line(row, methods.get(row["method"], row), first))
            if row["status"] == "error":
                notes.append(f"{backend_name} error at L={row['length']} {_title(methods.get(row['method'], row), row['pass'])}: "
                             f"{row.get('error', '')}")
        lines.append("")
    lines += [f"  {note}" for note in notes]
    if settings.get("fixed_tokens"):
        lines += speed_figure_summary(report)
    for name, reason in report.get("skipped_backends", {}).items():
        lines.append(f"skipped backend {name}: {reason}")
    reasons = sorted({r["reason"] for r in report["results"] if r["status"] == "skipped: shape" and r.get("reason")})
    lines += [f"skip shape = {reason}" for reason in reasons]
    if any(r["status"] == "skipped: memory" for r in report["results"]):
        lines.append(f"skip memory = estimated peak above --memory-budget-gb {settings['memory_budget_gb']:g}")
    if any(r["status"] == "skipped: time" for r in report["results"]):
        lines.append(f"skip time = --time-budget {settings['time_budget_s']:g} s ran out")
    lines += [f"warning: {warning}" for warning in report.get("warnings", [])]
    load = (report.get("load_1min_start"), report.get("load_1min_end"))
    if load[0] is not None:
        lines.append(f"load average (1 min): {load[0]:.2f} at the start, {load[1]:.2f} at the end; "
                     f"{report['hardware'].get('usable_cpus')} usable cores")
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


def require_matplotlib() -> None:
    """Raise ``ValueError`` with the install hint when matplotlib is missing (before any work)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'reformer-core[bench]' (or pip install matplotlib)") \
            from None


def _pyplot():
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_KIND_ORDER = ("lsh", "local", "full", "train")
_PANEL_TITLES = {"lsh": "LSH attention", "local": "local attention", "full": "full attention (core and native)",
                 "train": "training step"}
_LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2)), (0, (3, 1, 1, 1, 1, 1, 1, 1)), (0, (1, 3)),
                (0, (12, 2, 2, 2)))
_PASS_MARKERS = {"forward": "o", "backward": "s", "step": "^"}


def _length_text(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def _method_colour(method: dict, hashes: list[int]):
    """Colour by attention kind: LSH in shades of blue by hash count, the others one hue each."""
    import matplotlib

    kind = method["kind"]
    if kind == "lsh":
        position = hashes.index(method["num_hashes"]) if method["num_hashes"] in hashes else 0
        return matplotlib.colormaps["Blues"](0.45 + 0.55 * (position + 1) / max(len(hashes), 1))
    return {"local": "tab:green", "full": "tab:red", "native": "tab:purple", "train": "tab:brown"}.get(kind, "black")


def _title_text(report: dict) -> str:
    settings = report["settings"]
    versions = report.get("versions", {})
    devices = ", ".join(f"{name} {short_device(d.get('device', '?'))} {d.get('version') or ''}".strip()
                        for name, d in report["backends"].items())
    batch = f"batch {settings['fixed_tokens']}//L" if settings.get("fixed_tokens") else f"batch {settings['batch']}"
    return (f"reformer-core {versions.get('reformer_core', '')} bench: {batch}, heads {settings['heads']}, head_dim "
            f"{settings['head_dim']}, chunk {settings['chunk_length']}, "
            f"{'causal' if settings['causal'] else 'not causal'}, {settings['dtype']}, {settings.get('threads')} "
            f"threads\n{devices}; numpy {versions.get('numpy', '')}, python {versions.get('python', '')}")


def plot_report(report: dict, path: str) -> None:
    """Small multiples against length, one column per attention kind (LSH, local, full with the
    native kernel, training step) and one row per pass (forward, forward+backward) for the time,
    plus a row for peak memory; colour by method (attention kind; LSH shades by hash count),
    line style by backend or peer, marker by pass; log-log with labelled ticks; the legend beside
    the axes; a title with shapes, dtype, threads, devices and versions."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ok = [r for r in report["results"] if r["status"] == "ok" and r.get("time_s")]

    def kind_of(row):
        return "full" if row["kind"] == "native" else row["kind"]

    kinds = [k for k in _KIND_ORDER if any(kind_of(r) == k for r in ok)]
    if not kinds:
        raise ValueError("nothing to plot: no row ran")
    time_passes = [p for p in ("forward", "backward") if any(r["pass"] == p for r in ok)] or ["forward"]
    with_memory = any(r.get("peak_memory_bytes") for r in ok)
    panel_rows = [("time", p) for p in time_passes] + ([("memory", None)] if with_memory else [])
    fig, axes = plt.subplots(len(panel_rows), len(kinds), figsize=(4.0 * len(kinds) + 3.0, 3.1 * len(panel_rows) + 1.0),
                             squeeze=False)
    methods = {m["name"]: m for m in report["methods"]}
    hashes = sorted(m["num_hashes"] for m in report["methods"] if m["kind"] == "lsh")
    styles = {name: _LINE_STYLES[i % len(_LINE_STYLES)] for i, name in enumerate(report["backends"])}
    lengths = sorted({r["length"] for r in ok})
    for column, kind in enumerate(kinds):
        series = {}
        for row in ok:
            if kind_of(row) == kind:
                series.setdefault((row["backend"], row["method"], row["pass"]), []).append(row)
        for row_index, (quantity, pass_name) in enumerate(panel_rows):
            ax = axes[row_index][column]
            drawn = False
            for (backend_name, method_name, row_pass), rows in series.items():
                rows = sorted(rows, key=lambda r: r["length"])
                if quantity == "time":
                    if not (row_pass == pass_name or (row_pass == "step" and pass_name == time_passes[0])):
                        continue
                    points = [(r["length"], r["time_s"]) for r in rows]
                else:
                    points = [(r["length"], r["peak_memory_bytes"] / 2**20) for r in rows if r.get("peak_memory_bytes")]
                if not points:
                    continue
                ax.plot([p[0] for p in points], [p[1] for p in points],
                        color=_method_colour(methods.get(method_name, rows[0]), hashes),
                        linestyle=styles.get(backend_name, "-"), marker=_PASS_MARKERS.get(row_pass, "o"),
                        markerfacecolor="white" if row_pass == "backward" else None, markersize=4, linewidth=1.2)
                drawn = True
            if not drawn:
                ax.axis("off")
                continue
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(lengths)
            ax.set_xticklabels([_length_text(n) for n in lengths])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_minor_formatter(NullFormatter())
            if quantity == "time":
                ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: format_seconds(y)))
                what = "step" if kind == "train" else PASS_TITLES[pass_name]
                ax.set_title(f"{_PANEL_TITLES[kind]}: {what} time" if row_index else f"{_PANEL_TITLES[kind]}\n{what} time",
                             fontsize=9)
            else:
                ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g} MiB"))
                ax.set_title("peak memory per call", fontsize=9)
            ax.set_xlabel("sequence length", fontsize=8)
            ax.grid(True, which="major", alpha=0.3)
            ax.tick_params(labelsize=7)
    handles = [Line2D([], [], color="none", label="colour: method")]
    ran = {r["method"] for r in ok}
    for method in report["methods"]:
        if method["name"] in ran:
            handles.append(Line2D([], [], color=_method_colour(method, hashes), linewidth=2, label=method_title(method)))
    handles.append(Line2D([], [], color="none", label="line: backend / peer"))
    for name in report["backends"]:
        if any(r["backend"] == name for r in ok):
            handles.append(Line2D([], [], color="black", linestyle=styles[name], label=name))
    handles.append(Line2D([], [], color="none", label="marker: pass"))
    for pass_name in ("forward", "backward", "step"):
        if any(r["pass"] == pass_name for r in ok):
            handles.append(Line2D([], [], color="black", linestyle="none", marker=_PASS_MARKERS[pass_name],
                                  markerfacecolor="white" if pass_name == "backward" else None,
                                  label=PASS_TITLES[pass_name]))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1 - 2.8 / fig.get_figwidth(), 0.5), fontsize=7,
               frameon=False, handlelength=3.5)
    fig.suptitle(_title_text(report), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 2.9 / fig.get_figwidth(), 0.94))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory_report(report: dict, path: str) -> None:
    """``bench --memory``: training-step memory against depth, one panel per backend (colour and
    marker by mode: reversible, storing activations), and NumPy's feed-forward backward memory
    against length; the legend beside the axes."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    backends = list(dict.fromkeys(row["backend"] for row in report["depth"]))
    panels = len(backends) + (1 if report.get("feed_forward") else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels + 2.6, 4.2), squeeze=False)
    colours = {"reversible": "tab:blue", "stored": "tab:orange"}
    labels = {"reversible": "reversible", "stored": "storing activations"}
    for column, spec in enumerate(backends):
        ax = axes[0][column]
        rows = [r for r in report["depth"] if r["backend"] == spec and r.get("bytes") is not None]
        for mode in ("reversible", "stored"):
            mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["layers"])
            if mine:
                ax.plot([r["layers"] for r in mine], [r["bytes"] / 2**20 for r in mine], color=colours[mode],
                        marker="o", linewidth=1.4)
        depths = sorted({r["layers"] for r in rows})
        ax.set_xticks(depths)
        first = rows[0] if rows else {}
        ax.set_title(f"{spec} ({first.get('method', '')})", fontsize=9)
        ax.set_xlabel("layers")
        ax.set_ylabel("MiB beyond parameters and gradients" if column == 0 else "")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    if report.get("feed_forward"):
        ax = axes[0][-1]
        for chunk, colour, label in ((64, "tab:green", "ff_chunk_length=64"), (None, "tab:red", "unchunked")):
            rows = sorted((r for r in report["feed_forward"] if r["ff_chunk_length"] == chunk), key=lambda r: r["length"])
            ax.plot([r["length"] for r in rows], [r["intermediate_bytes"] / 2**20 for r in rows], color=colour,
                    marker="s", label=label)
        ax.set_xscale("log", base=2)
        lengths = sorted({r["length"] for r in report["feed_forward"]})
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(n) for n in lengths])
        ax.set_title("NumPy feed-forward backward", fontsize=9)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("MiB of intermediates")
        ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], color=colours[m], marker="o", label=labels[m]) for m in ("reversible", "stored")]
    if report.get("feed_forward"):
        handles += [Line2D([], [], color="tab:green", marker="s", label="ff chunked (64)"),
                    Line2D([], [], color="tab:red", marker="s", label="ff unchunked")]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1 - 2.4 / fig.get_figwidth(), 0.5), fontsize=8,
               frameon=False)
    settings = report["settings"]
    config = settings.get("depth_config", {})
    hardware = report.get("hardware", {})
    fig.suptitle(f"training-step memory against depth: L={settings.get('length')}, batch {settings.get('batch')}, "
                 f"d_model {config.get('d_model')}, {config.get('num_heads')} heads, LSH-{config.get('num_hashes')}, "
                 f"chunk {config.get('lsh_chunk_length')}; numpy {hardware.get('numpy', '')}, python "
                 f"{hardware.get('python', '')}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 2.5 / fig.get_figwidth(), 0.92))
    fig.savefig(path, dpi=120)
    plt.close(fig)
