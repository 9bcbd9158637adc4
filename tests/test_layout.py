"""The tree shows the architecture: what may import what, the backend protocol, the wheel.

* ``reformer_core/`` (the algorithms, the model, the registry, the CLI entry point) never
  imports ``reformer_core.bench`` and never a framework;
* every adapter implements the whole protocol of ``backends/_base.py``, and the registry lists
  every folder of ``backends/``;
* nothing imports another module's underscored names;
* a non-editable ``pip install .`` ships everything the commands need.
"""

from __future__ import annotations

import ast
import inspect
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import reformer_core as rc
from reformer_core.backends import ADAPTERS, Backend

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The folders that are installed, and the package each becomes.
PACKAGES = {"reformer_core": "reformer_core", "backends": "reformer_core.backends",
            "conformance": "reformer_core.conformance", "bench": "reformer_core.bench"}


def _python_files(folder: str):
    return sorted((ROOT / folder).rglob("*.py"))


def _module_name(path: pathlib.Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGES.get(relative.parts[0], relative.parts[0]), *relative.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path):
    """``(absolute module, imported names)`` of every import statement in ``path`` (any depth)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            yield target, [alias.name for alias in node.names]


def test_the_core_never_imports_the_benchmarks():
    offenders = []
    for path in _python_files("reformer_core"):
        for target, names in _imports(path):
            full = [target] + [f"{target}.{name}" for name in names]
            if any(t == "reformer_core.bench" or t.startswith("reformer_core.bench.") for t in full):
                offenders.append(f"{path.relative_to(ROOT)} imports {target} {names}")
    assert not offenders, offenders


def test_the_core_imports_no_framework_even_when_used():
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        import reformer_core as rc
        import reformer_core.cli
        import reformer_core.backends
        rc.available_backends()
        config = rc.ReformerConfig(vocab_size=8, d_model=8, num_heads=2, head_dim=4, d_ff=8,
                                   attention_layers=("lsh", "local"), num_buckets=4, lsh_chunk_length=4,
                                   local_chunk_length=4, axial_pos_shape=(4, 4))
        params = rc.init_params(config, 0)
        rc.apply(params, np.zeros((1, 16), dtype=np.int64), config)
        print(",".join(sorted(m for m in ("torch", "jax", "jaxlib", "cupy", "matplotlib") if m in sys.modules)))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"using the core on NumPy imported {result.stdout.strip()}"


def test_no_module_imports_another_modules_underscored_names():
    offenders = []
    for folder in ("reformer_core", "backends", "conformance", "bench", "tests"):
        for path in _python_files(folder):
            for target, names in _imports(path):
                private = [name for name in names if name.startswith("_") and not name.startswith("__")]
                if private and target.startswith("reformer_core"):
                    offenders.append(f"{path.relative_to(ROOT)}: from {target} import {private}")
    assert not offenders, offenders


def test_the_registry_lists_every_backend_folder():
    folders = sorted(p.name for p in (ROOT / "backends").iterdir()
                     if p.is_dir() and not p.name.startswith(("_", ".")) and (p / "adapter.py").exists())
    assert sorted(cls.name for cls in ADAPTERS) == folders
    assert rc.known_backends() == tuple(cls.name for cls in ADAPTERS)
    for cls in ADAPTERS:  # each adapter lives in its own folder's adapter.py
        assert cls.__module__ == f"reformer_core.backends.{cls.name}.adapter"


def _protocol_methods() -> list[str]:
    return [name for name, member in vars(Backend).items()
            if not name.startswith("_") and (callable(member) or isinstance(member, property))]


@pytest.mark.parametrize("cls", ADAPTERS, ids=lambda cls: cls.name)
def test_every_adapter_implements_the_whole_protocol(cls):
    assert issubclass(cls, Backend)
    for attribute in ("name", "framework", "extra", "array_modules"):
        assert attribute in vars(cls), f"{cls.__name__} does not declare {attribute}"
    assert cls.name and cls.framework and cls.array_modules
    required = ("xp", "devices", "from_numpy", "to_numpy", "version", "capabilities")
    for name in required:  # the base raises NotImplementedError or returns nothing useful
        assert name in vars(cls), f"{cls.__name__} does not implement {name}"
    for name in _protocol_methods():  # every optional method is reachable with its default
        member = inspect.getattr_static(cls, name)
        assert callable(member) or isinstance(member, property), name
    assert isinstance(inspect.getattr_static(cls, "capabilities"), property), \
        f"{cls.__name__}.capabilities must be a property, like every adapter's"


def test_optional_methods_have_clear_defaults():
    backend = rc.get_backend()  # numpy
    with pytest.raises(NotImplementedError, match="no device allocator"):
        backend.peak_device_memory(lambda: None)
    with pytest.raises(NotImplementedError, match="no device allocator"):
        backend.memory_in_use()
    with pytest.raises(NotImplementedError, match="cannot compile"):
        backend.jit(lambda: None)
    with pytest.raises(NotImplementedError, match="no native attention"):
        backend.native_full_attention(None, None, None, causal=True)
    assert backend.native_lsh_attention is False
    with pytest.raises(NotImplementedError, match="no native LSH attention kernel"):
        backend.lsh_chunk_attention(None, None, None, None, key_keep=None, logit_bias=None, dropout_keep=None,
                                    dropout_rate=0.0, chunk_length=4, num_chunks_before=1, num_chunks_after=0,
                                    causal=True)
    marker = object()
    assert backend.stop_gradient(marker) is marker


def test_public_api_is_explicit_and_documented():
    for name in rc.__all__:
        member = getattr(rc, name)
        assert member is not None, name
        if callable(member):
            assert (member.__doc__ or "").strip(), f"reformer_core.{name} has no docstring"
    for name in ("value_and_grad", "Adam", "ReversibleLayer", "reversible_backward", "Differentiable"):
        assert name in rc.__all__, name


@pytest.mark.slow
def test_a_non_editable_install_ships_every_command(tmp_path):
    """``pip install .`` (a wheel, no source tree on the path), then the commands run from it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # This environment's dependencies are visible to the venv, but not its editable finder (a .pth
    # line adds a folder to sys.path without running the .pth files inside it).
    import numpy

    parent_site = pathlib.Path(numpy.__file__).resolve().parent.parent
    pathlib.Path(site, "parent-site.pth").write_text(f"{parent_site}\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(ROOT)],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout + install.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REFORMER_BACKEND")}
    command = venv / "bin" / "reformer-core"

    def run(*args, timeout=900):
        result = subprocess.run([str(command), *args], capture_output=True, text=True, cwd=tmp_path, env=env,
                                timeout=timeout)
        assert result.returncode == 0, f"reformer-core {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    where = subprocess.run([str(python), "-c", "import reformer_core; print(reformer_core.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout
    assert str(venv) in where and str(ROOT) not in where, where
    assert "numpy   ready" in run("info")
    assert "lsh x1" in run("bench", "--quick", "--backends", "numpy", "--no-progress")
    table = run("check", "--backends", "numpy", "--max-examples", "2")
    assert "lsh_attention" in table and "FAIL" not in table
