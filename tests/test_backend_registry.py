"""Choosing a backend: the registry, process default, scoped override, environment, inference.

Tests that change the process default use the ``restore_backend`` fixture (conftest), which
clears ``set_backend``'s default and hides ``$REFORMER_BACKEND``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import array_api_strict as xs
import numpy as np
import pytest

import reformer_core as rc
from reformer_core import tree_leaves

pytestmark = pytest.mark.usefixtures("restore_backend")

DEVICE1 = xs.Device("device1")
CPU = xs.Device("CPU_DEVICE")


def run_python(code: str, **env_changes: str | None) -> str:
    """Run ``code`` in a fresh interpreter (environment changed as given); return its stdout."""
    env = dict(os.environ)
    env.pop("REFORMER_BACKEND", None)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# ---------------------------------------------------------------- the registry


def test_available_backends_include_numpy_and_strict():
    available = rc.available_backends()
    assert {"numpy", "strict"} <= set(available)
    assert set(available) <= set(rc.known_backends())


def test_known_backends():
    assert set(rc.known_backends()) == {"numpy", "strict", "torch", "jax", "cupy"}


def test_default_is_numpy():
    backend = rc.get_backend()
    assert backend.name == "numpy"
    assert backend.device == "cpu"


# ---------------------------------------------------------------- set_backend and use_backend


def test_set_backend():
    returned = rc.set_backend("strict")
    assert rc.get_backend().name == "strict"
    assert rc.get_backend() is returned
    assert rc.get_backend().device == CPU


def test_set_backend_is_case_and_space_insensitive():
    assert rc.set_backend(" Strict ").name == "strict"


def test_use_backend_nests_and_restores():
    rc.set_backend("strict")
    with rc.use_backend("numpy") as outer:
        assert rc.get_backend() is outer
        assert outer.name == "numpy"
        with rc.use_backend("strict", device="device1") as inner:
            assert rc.get_backend() is inner
            assert (inner.name, inner.device) == ("strict", DEVICE1)
        assert rc.get_backend() is outer
    assert rc.get_backend().name == "strict"  # back to set_backend's default
    assert rc.get_backend().device == CPU


def test_use_backend_restores_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with rc.use_backend("strict"):
            raise RuntimeError("boom")
    assert rc.get_backend().name == "numpy"


def test_use_backend_does_not_leak_into_new_threads():
    """A new thread starts with a fresh context: it sees the process default, not the block."""
    seen = {}

    def record():
        seen["name"] = rc.get_backend().name

    with rc.use_backend("strict"):
        thread = threading.Thread(target=record)
        thread.start()
        thread.join()
        assert rc.get_backend().name == "strict"
    assert seen == {"name": "numpy"}


def test_use_backend_in_one_thread_leaves_other_threads_alone():
    entered, checked = threading.Event(), threading.Event()
    seen = {}

    def worker():
        with rc.use_backend("strict"):
            seen["worker"] = rc.get_backend().name
            entered.set()
            checked.wait(timeout=10)

    thread = threading.Thread(target=worker)
    thread.start()
    assert entered.wait(timeout=10)
    seen["main"] = rc.get_backend().name  # while the worker is inside its block
    checked.set()
    thread.join()
    assert seen == {"worker": "strict", "main": "numpy"}


def test_environment_variable_selects_backend():
    code = """
        import reformer_core as rc
        b = rc.get_backend()
        print(b.name, b.device)
    """
    assert run_python(code, REFORMER_BACKEND="strict").startswith("strict ")
    assert run_python(code, REFORMER_BACKEND="strict:device1") == "strict array_api_strict.Device('device1')"
    assert run_python(code) == "numpy cpu"


def test_set_backend_overrides_environment_variable(monkeypatch):
    monkeypatch.setenv("REFORMER_BACKEND", "strict")
    assert rc.get_backend().name == "strict"
    rc.set_backend("numpy")
    assert rc.get_backend().name == "numpy"


# ---------------------------------------------------------------- devices


def test_device_in_spec():
    backend = rc.set_backend("strict:device1")
    assert backend.name == "strict"
    assert backend.device == DEVICE1
    assert rc.get_backend().device == DEVICE1


def test_device_argument_matches_spec():
    assert rc.set_backend("strict", device="device1") == rc.set_backend("strict:device1")
    assert rc.set_backend("strict", device=DEVICE1).device == DEVICE1


def test_init_params_on_the_backend_device(tiny_config):
    backend = rc.set_backend("strict:device1")
    params = rc.init_params(tiny_config, backend=backend)
    leaves = tree_leaves(params)
    assert leaves and all(leaf.device == DEVICE1 for leaf in leaves)
    # the default backend (set above) gives the same placement and the same numbers
    again = tree_leaves(rc.init_params(tiny_config))
    assert all(a.device == DEVICE1 for a in again)
    assert all(np.array_equal(backend.to_numpy(a), backend.to_numpy(b)) for a, b in zip(leaves, again))


def test_random_rotations_on_the_backend_device():
    backend = rc.set_backend("strict:device1")
    rotations = rc.random_rotations(0, 2, 4, 3, (2, 4), backend=backend)
    assert rotations.device == DEVICE1
    assert tuple(rotations.shape) == (2, 4, 3, 3)
    assert rotations.dtype == xs.float32
    # same numbers as on NumPy
    on_numpy = rc.random_rotations(0, 2, 4, 3, (2, 4), backend=rc.set_backend("numpy"))
    np.testing.assert_array_equal(backend.to_numpy(rotations), on_numpy)


def test_random_rotations_follow_like():
    like = xs.asarray(np.zeros((1, 2, 8, 4)), device=DEVICE1)
    rotations = rc.random_rotations(0, 2, 4, 2, 4, like=like)
    assert rotations.device == DEVICE1
    assert rotations.dtype == xs.float64


# ---------------------------------------------------------------- inference from arrays


def test_backend_for_numpy():
    backend = rc.backend_for(np.zeros(3))
    assert (backend.name, backend.device) == ("numpy", "cpu")


@pytest.mark.parametrize("device", [CPU, DEVICE1])
def test_backend_for_strict_and_its_device(device):
    array = xs.zeros(3, device=device)
    backend = rc.backend_for(array, None, xs.ones(2, device=device))
    assert (backend.name, backend.device) == ("strict", device)


def test_backend_for_reuses_the_current_backend():
    current = rc.set_backend("strict:device1")
    assert rc.backend_for(xs.zeros(3, device=DEVICE1)) is current


def test_backend_for_mixed_frameworks():
    with pytest.raises(TypeError, match=r"different frameworks were mixed: \['numpy', 'strict'\]"):
        rc.backend_for(np.zeros(3), xs.zeros(3))


# ---------------------------------------------------------------- host round trips


@pytest.mark.parametrize("spec", ["numpy", "strict", "strict:device1"])
def test_from_numpy_to_numpy_round_trip_float64(spec, rng):
    backend = rc.set_backend(spec)
    host = rng.standard_normal((3, 5))
    array = backend.from_numpy(host)
    back = backend.to_numpy(array)
    assert back.dtype == np.float64
    np.testing.assert_array_equal(back, host)  # exact
    assert back is not host


@pytest.mark.parametrize("spec", ["numpy", "strict", "strict:device1"])
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_dtype_names_kept(spec, dtype_name, rng):
    backend = rc.set_backend(spec)
    array = backend.from_numpy(rng.standard_normal(4), dtype=dtype_name)
    assert array.dtype == backend.dtype(dtype_name)
    assert str(array.dtype).rsplit(".", 1)[-1] == dtype_name
    assert backend.to_numpy(array).dtype == np.dtype(dtype_name)
    if spec.startswith("strict"):
        assert array.device == backend.device


def test_from_numpy_copies():
    backend = rc.get_backend()
    host = np.zeros(3)
    array = backend.from_numpy(host)
    host[0] = 1.0
    assert array[0] == 0.0


# ---------------------------------------------------------------- no framework imported


def test_numpy_use_imports_no_other_framework():
    code = """
        import json, sys
        import numpy as np
        import reformer_core as rc

        before = sorted(m for m in ("torch", "jax", "cupy") if m in sys.modules)
        rng = np.random.default_rng(0)
        qk = rng.standard_normal((1, 2, 8, 4))
        v = rng.standard_normal((1, 2, 8, 4))
        rotations = rc.random_rotations(0, 2, 4, 2, 4, like=qk)
        out = rc.lsh_attention(qk, v, rotations, num_buckets=4, chunk_length=4, causal=True)
        assert out.shape == qk.shape
        rc.available_backends()  # looks for frameworks without importing them
        after = sorted(m for m in ("torch", "jax", "cupy") if m in sys.modules)
        print(json.dumps({"backend": rc.get_backend().name, "before": before, "after": after}))
    """
    report = json.loads(run_python(code))
    assert report == {"backend": "numpy", "before": [], "after": []}
