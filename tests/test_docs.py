"""The docs' code blocks (run by pytest-markdown-docs through the root conftest.py): how they are
collected, and that a block needing a framework that is not installed is skipped, with the reason."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fences(path: Path) -> list[str]:
    """The info strings of the top-level code fences of a Markdown file."""
    return re.findall(r"^```(.*)$", path.read_text(encoding="utf-8"), flags=re.MULTILINE)[::2]


def test_every_code_block_says_what_it_is():
    # a fence without a language would be neither run nor visibly exempt
    for path in DOCS:
        for info in fences(path):
            assert info.strip(), f"{path.name}: a code fence without a language (use python, sh or text)"
            assert "notest" not in info.split(), f"{path.name}: `{info}` (skip with a reason instead)"


def test_blocks_needing_a_missing_framework_are_skipped_with_the_reason():
    # torch and JAX hidden (as when they are not installed): their blocks skip, nothing fails
    code = ("import sys, pytest\n"
            "sys.modules.update(torch=None, jax=None, optax=None)\n"
            "sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', 'docs/torch.md', 'docs/jax.md']))\n")
    completed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = completed.stdout
    assert completed.returncode == 0, out + completed.stderr
    assert "passed" not in out.splitlines()[-1] and "failed" not in out
    assert re.search(r"SKIPPED \[\d+\] docs/torch\.md(:\d+)?: needs torch \(pip install -e '\.\[torch\]'\)", out)
    assert re.search(r"SKIPPED \[\d+\] docs/jax\.md(:\d+)?: needs jax, optax", out)


def test_every_public_name_has_a_docstring():
    import inspect

    import reformer_core as rc

    missing = [name for name in rc.__all__ if not name.startswith("__")
               and (inspect.isfunction(getattr(rc, name)) or inspect.isclass(getattr(rc, name)))
               and not inspect.getdoc(getattr(rc, name))]
    assert not missing, f"public names without a docstring (the API reference shows them empty): {missing}"


def test_the_docs_site_builds_with_warnings_as_errors(tmp_path):
    # MkDocs + mkdocstrings (mkdocs.yml): every page of docs/, the API reference from the docstrings;
    # --strict turns a broken link or anchor, or a docstring griffe cannot parse, into a failure
    import pytest

    pytest.importorskip("mkdocstrings", reason="the docs site needs mkdocs and mkdocstrings[python] "
                                               "(requirements-ci.txt)")
    completed = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "lsh_attention" in api and "ReformerConfig" in api
