"""The ``reformer-core`` command: ``info`` here; ``bench``, ``train`` and ``check`` where they live.

The entry point only knows each command's name, one-line summary and module (the way pip
finds its commands): the module of the command that runs is imported then, and only it. So
the core has no import dependency on the benchmark harness or the conformance suite, and
importing this module imports no framework. A command module provides
``add_arguments(parser)`` and ``run(args, argv) -> exit status``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import os
import platform
import re
import sys
from importlib import metadata

__all__ = ["main", "build_parser", "COMMANDS", "int_list", "positive_float", "write_json", "short_device",
           "collect_info", "format_info"]

#: name -> (module with add_arguments/run, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("reformer_core.cli", "list backends: installed or not, versions, devices, how to install"),
    "bench": ("reformer_core.bench.command",
              "time and measure memory of LSH attention (1-8 hashes) vs full attention, side by side"),
    "check": ("reformer_core.conformance.command",
              "run the conformance suite: every installed backend against the float64 NumPy oracle"),
    "train": ("reformer_core.bench.copy_task",
              "train a small Reformer on the paper's duplication task (0 w 0 w) and evaluate with 1-8 hashes"),
    "generate": ("reformer_core._model.generate_command", "continue a text prompt with a saved model, streaming"),
    "convert": ("reformer_core._io.convert", "convert between HF Reformer folders and .npz/.safetensors checkpoints"),
}


# ---------------------------------------------------------------- argument types shared by commands


def int_list(text: str) -> tuple[int, ...]:
    """``"1024,2048"`` -> ``(1024, 2048)``: positive integers (argparse ``type=``)."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1024,2048, got {text!r}")
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def positive_float(text: str) -> float:
    """A number > 0 (argparse ``type=``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def write_json(path: str, report: dict) -> None:
    """Write ``report`` to ``path`` (folders made as needed) and say so on stderr."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")
    print(f"wrote {path}", file=sys.stderr)


def short_device(device: str) -> str:
    """``"array_api_strict.Device('device1')"`` -> ``"device1"``; other names unchanged."""
    match = re.fullmatch(r"[\w.]+\('(.*)'\)", str(device))
    return match.group(1) if match else str(device)


# ---------------------------------------------------------------- info


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


def collect_info() -> dict:
    """Everything ``reformer-core info`` shows, as a JSON-ready dict."""
    import numpy as np

    from . import __version__
    from ._registry import adapter_class, install_hint, known_backends, use_backend

    backends = []
    for name in known_backends():
        framework = adapter_class(name).framework
        installed = importlib.util.find_spec(framework) is not None  # finds, does not import
        entry = {
            "name": name,
            "framework": framework,
            "installed": installed,
            "framework_version": _framework_version(framework) if installed else None,
            "usable": False,
            "install": None if installed else install_hint(name),
        }
        if installed:
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
        else:
            status = "broken"
            version = f"{entry['framework']} {entry['framework_version']}"
            detail = entry.get("error", "")
        lines.append(f"  {entry['name']:<7} {status:<14} {version:<24} {detail}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``reformer-core info``'s arguments."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """``reformer-core info``."""
    info = collect_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


# ---------------------------------------------------------------- the entry point


def package_version() -> str:
    """The installed distribution's version (importlib.metadata), else the source tree's ``__version__``."""
    try:
        return metadata.version("reformer-core")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        from . import __version__

        return __version__


def _command_name(argv: list[str]) -> str | None:
    """The first argument that names a command (options come only after it)."""
    for argument in argv:
        if argument in COMMANDS:
            return argument
        if not argument.startswith("-"):
            return None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser: every command listed; the arguments of ``command`` (or of all) filled in."""
    parser = argparse.ArgumentParser(
        prog="reformer-core",
        description="The Reformer written once against the Python Array API: inspect, benchmark, check and train.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for name, (module_name, summary) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        if command is None or name == command:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``reformer-core`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_name(argv)
    parser = build_parser(command) if command else build_parser("info")
    args = parser.parse_args(argv)
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args, argv)
    except BrokenPipeError:  # `reformer-core bench | head`: stop quietly, as other shell tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
