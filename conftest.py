"""Repository-root pytest configuration: run the Python code blocks of README.md and docs/*.md.

The blocks are collected and run by the pytest-markdown-docs plugin (the ``[test]`` extra),
with its info-string options: ``continuation`` (keep the names of the block before),
``notest`` (never run), ``fixture:NAME``. Shell commands, outputs and diagrams are fenced as
``sh``/``bash``/``text``, so the plugin leaves them alone. The plugin's own ``--markdown-docs``
flag would also import every ``.py`` file to search its docstrings; here only the Markdown files
are collected, so ``python -m pytest`` (``testpaths`` in pyproject.toml) runs them with the tests.

A block that imports an optional framework (torch, JAX, ...) that is not installed is skipped
with the reason and the extra that installs it (``-ra`` lists it). Every block runs in a fresh
temporary working directory (files it writes, such as ``model.npz``, go there) and leaves
the process-wide backend default as it found it.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent

#: top-level module -> the install hint shown when a block needs it and it is missing
OPTIONAL_MODULES = {
    "torch": "pip install -e '.[torch]'",
    "jax": "pip install -e '.[jax]'",
    "optax": "pip install optax",
    "transformers": "pip install transformers",
    "safetensors": "pip install safetensors",
    "matplotlib": "pip install -e '.[bench]'",
    "cupy": "pip install -e '.[cupy]'",
}


def _is_doc_file(path: Path) -> bool:
    path = path.resolve()
    return path == ROOT / "README.md" or (path.suffix == ".md" and path.parent == ROOT / "docs")


class _PluginMissing(pytest.File):
    def collect(self):
        pytest.skip("the code blocks of the docs need pytest-markdown-docs: pip install -e '.[test]'")


def pytest_collect_file(file_path: Path, parent):
    if not _is_doc_file(Path(file_path)):
        return None
    if getattr(parent.config.option, "markdowndocs", False):
        return None  # the plugin's own flag collects Markdown files itself
    try:
        from pytest_markdown_docs.plugin import MarkdownTextFile
    except ImportError:
        return _PluginMissing.from_parent(parent, path=Path(file_path))
    return MarkdownTextFile.from_parent(parent, path=Path(file_path))


def _imported_modules(code: str) -> set[str]:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()  # let the block fail with its own error
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def _needs_framework(code: str) -> set[str]:
    """Optional frameworks a block imports, or reaches through the core's adapter modules."""
    modules = _imported_modules(code)
    if "reformer_core.backends.torch" in code:
        modules.add("torch")
    if "reformer_core.backends.jax" in code:
        modules.add("jax")
    return modules


def _installed(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None  # None: import blocked
    return importlib.util.find_spec(name) is not None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not _is_markdown_block(item):
            continue
        missing = sorted(name for name in _needs_framework(item.code) & OPTIONAL_MODULES.keys()
                         if not _installed(name))
        if missing:
            hints = "; ".join(OPTIONAL_MODULES[name] for name in missing)
            item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(missing)} ({hints})"))


def _is_markdown_block(item) -> bool:
    return item.get_closest_marker("markdown-docs") is not None and hasattr(item, "code")


@pytest.fixture
def slow_doc_block():
    """For a code block fenced ``python fixture:slow_doc_block``: skipped (with this reason) unless
    ``REFORMER_DOCS_SLOW=1``, to keep the docs' tests short."""
    if os.environ.get("REFORMER_DOCS_SLOW") != "1":
        pytest.skip("slow block (compiles for 15-30 s on a CPU); REFORMER_DOCS_SLOW=1 runs it")


@pytest.fixture(autouse=True)
def _markdown_block_sandbox(request):
    """For code blocks of the docs: a temporary working directory, and the backend default restored."""
    if not _is_markdown_block(request.node):
        yield
        return
    from reformer_core import _registry

    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.chdir(request.getfixturevalue("tmp_path"))
    monkeypatch.delenv("REFORMER_BACKEND", raising=False)
    saved = _registry._default
    try:
        yield
    finally:
        _registry._default = saved
