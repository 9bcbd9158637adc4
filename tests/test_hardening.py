"""Regression tests of issue 12, findings 5-9: the backend selector runs nothing but a Backend
subclass, checkpoints are validated before they are decompressed, a named backend that can
never run fails `check`, the loss never wraps a bad target or divides 0 by 0, and parameters
are only ever floating."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

import reformer_core as rc
from reformer_core._model.lm import cross_entropy_loss_vjp
from reformer_core.cli import main

pytestmark = pytest.mark.usefixtures("restore_backend")

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs PyTorch (pip install 'reformer-core[torch]')")
needs_jax = pytest.mark.skipif(not HAS_JAX, reason="needs JAX (pip install 'reformer-core[jax]')")
INSTALLED_BACKENDS = [name for name in ("numpy", "strict", "torch", "jax") if name in rc.available_backends()]


# ---------------------------------------------------------------- 5: a backend spec names a Backend subclass


SPY_MODULE = """
calls = []


def factory(*args, **kwargs):
    calls.append(("factory", args, kwargs))


class NotABackend:
    def __init__(self, *args, **kwargs):
        calls.append(("NotABackend", args, kwargs))


instance = NotABackend.__new__(NotABackend)

from reformer_core.backends.numpy.adapter import NumpyBackend


class SpyBackend(NumpyBackend):
    name = "spy"

    def __init__(self, device=None):
        calls.append(("SpyBackend", device))
        super().__init__(device)
"""


@pytest.fixture
def spy(tmp_path, monkeypatch):
    """A module ``hardening_spy`` whose callables record every call (and never run anything else)."""
    (tmp_path / "hardening_spy.py").write_text(SPY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("hardening_spy", None)
    yield tmp_path
    sys.modules.pop("hardening_spy", None)


def _spy_calls():
    return sys.modules["hardening_spy"].calls


@pytest.mark.parametrize("attribute", ["factory", "NotABackend", "instance"])
@pytest.mark.parametrize("how", ["environment", "set_backend", "use_backend", "resolve"])
def test_a_spec_that_is_not_a_backend_class_is_never_called(spy, monkeypatch, attribute, how):
    spec = f"hardening_spy:{attribute}:arg"
    with pytest.raises(TypeError, match=r"not a subclass of reformer_core\.backends\.Backend.*not called") as error:
        if how == "environment":
            monkeypatch.setenv("REFORMER_BACKEND", spec)
            rc.get_backend()
        elif how == "set_backend":
            rc.set_backend(spec)
        elif how == "use_backend":
            with rc.use_backend(spec):
                pass
        else:
            from reformer_core._registry import resolve_backend

            resolve_backend(spec)
    message = str(error.value)
    assert spec in message and "package.module:ClassName" in message  # names the spec and the valid form
    assert _spy_calls() == []  # importing the module was the only side effect


def test_os_system_spec_runs_no_command(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("REFORMER_BACKEND", f"os:system:touch {marker}")
    with pytest.raises(TypeError, match="os.system"):
        rc.get_backend()
    assert not marker.exists()


def test_os_system_spec_in_the_cli_runs_no_command(tmp_path, capsys):
    marker = tmp_path / "ran"
    assert main(["check", "--backends", f"os:system:touch {marker}"]) == 2
    assert not marker.exists()
    assert "not a subclass" in capsys.readouterr().err


def test_unloadable_specs_say_what_a_valid_spec_looks_like(spy):
    for spec, match in [("hardening_spy:missing", "has no attribute 'missing'"),
                        ("no_such_module_xyz:Backend", "No module named"),
                        ("hardening_spy:not.an.identifier", "neither a registered name")]:
        with pytest.raises(ValueError, match=match) as error:
            rc.set_backend(spec)
        assert "package.module:ClassName" in str(error.value)
    assert _spy_calls() == []


def test_a_backend_subclass_spec_still_works(spy):
    backend = rc.set_backend("hardening_spy:SpyBackend")
    assert type(backend).__name__ == "SpyBackend"
    assert _spy_calls() == [("SpyBackend", None)]
    backend = rc.set_backend("hardening_spy:SpyBackend:cpu")
    assert _spy_calls()[-1] == ("SpyBackend", "cpu")
    with pytest.raises(ValueError, match="already names a device"):
        rc.set_backend("hardening_spy:SpyBackend:cpu", device="cpu")


# ---------------------------------------------------------------- 6: checkpoints are validated before decompression


PARAM_ENTRY = "params/embedding/tokens.npy"


def _header(dtype: str, shape: tuple) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _rewrite(source, target, entry: str, header: bytes, zero_bytes: int) -> None:
    """Copy checkpoint ``source`` to ``target`` with ``entry`` replaced by ``header`` followed by
    ``zero_bytes`` zeros, deflated (a zip bomb: a few MB on disk for hundreds of MB declared)."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as dst:
        names = [info.filename for info in src.infolist()]
        for name in names + ([entry] if entry not in names else []):
            if name != entry:
                dst.writestr(name, src.read(name))
                continue
            with dst.open(name, "w", force_zip64=True) as file:
                file.write(header)
                block = bytes(1 << 22)
                left = zero_bytes
                while left > 0:
                    file.write(block[: min(left, len(block))])
                    left -= len(block)


@pytest.fixture
def checkpoint(tmp_path, tiny_config):
    path = tmp_path / "good.npz"
    params = rc.init_params(tiny_config, seed=1, backend="numpy")
    rc.save_checkpoint(path, params, tiny_config, optimizer_state={"m": rc.tree_map(np.zeros_like, params)})
    return path


def _load_measuring_peak(path):
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(ValueError) as error:
            rc.load_checkpoint(path, backend="numpy")
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(error.value), peak, seconds


@pytest.mark.parametrize("entry,declared_mib", [(PARAM_ENTRY, 512), ("optimizer/m/output/bias.npy", 64),
                                                ("__metadata__.npy", 64)])
def test_a_zip_bomb_is_refused_before_it_is_decompressed(checkpoint, tmp_path, entry, declared_mib):
    bomb = tmp_path / "bomb.npz"
    size = declared_mib << 20
    dtype, shape = ("<f4", (size // 4,)) if entry != "__metadata__.npy" else ("|u1", (size,))
    _rewrite(checkpoint, bomb, entry, _header(dtype, shape), size)
    assert bomb.stat().st_size < 4 << 20  # a few MB on disk
    with zipfile.ZipFile(bomb) as archive:
        assert archive.getinfo(entry).file_size > size  # declares hundreds of MB
    message, peak, seconds = _load_measuring_peak(bomb)
    assert entry in message and "refused before decompressing" in message
    assert peak < 16 << 20, f"peak traced memory {peak / 2**20:.1f} MiB while refusing the bomb"
    assert seconds < 2


def test_a_header_claiming_a_huge_array_is_refused_before_allocating(checkpoint, tmp_path):
    # The entry is small, but its .npy header says 1 GiB: numpy would allocate that before reading.
    lying = tmp_path / "lying.npz"
    _rewrite(checkpoint, lying, PARAM_ENTRY, _header("<f4", (1 << 28,)), 16 * 8 * 4)
    message, peak, _ = _load_measuring_peak(lying)
    assert "params/embedding/tokens" in message and "header" in message
    assert peak < 16 << 20


def test_a_parameter_entry_of_the_wrong_shape_is_refused_from_its_header(checkpoint, tmp_path, tiny_config):
    wrong = tmp_path / "wrong.npz"
    shape = (tiny_config.vocab_size + 1, tiny_config.d_model)
    _rewrite(checkpoint, wrong, PARAM_ENTRY, _header("<f4", shape), shape[0] * shape[1] * 4)
    with pytest.raises(ValueError, match=r"params/embedding/tokens has shape \(17, 8\).*needs \(16, 8\)"):
        rc.load_checkpoint(wrong, backend="numpy")


def test_a_good_checkpoint_still_loads(checkpoint, tiny_config):
    loaded = rc.load_checkpoint(checkpoint, backend="numpy")
    assert loaded.config == tiny_config
    assert loaded.optimizer_state["m"]["output"]["bias"].shape == (tiny_config.vocab_size,)


def test_oversized_metadata_is_refused_when_saving(tmp_path, tiny_config):
    params = rc.init_params(tiny_config, backend="numpy")
    with pytest.raises(ValueError, match="metadata takes"):
        rc.save_checkpoint(tmp_path / "big.npz", params, tiny_config, metadata={"blob": "x" * (17 << 20)})


# ---------------------------------------------------------------- 7: a named backend that can never run fails `check`


def test_check_with_an_unknown_backend_exits_2(capsys):
    assert main(["check", "--backends", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown backend 'nosuch'" in err and "known backends" in err


def test_check_with_a_typo_among_good_backends_exits_2(capsys):
    assert main(["check", "--backends", "numpy,nmupy"]) == 2
    assert "'nmupy'" in capsys.readouterr().err


def _uninstalled():
    missing = [name for name in rc.known_backends() if name not in rc.available_backends()]
    if not missing:
        pytest.skip("every known backend is installed here")
    return missing[0]


def test_check_with_an_uninstalled_backend_exits_2_with_the_install_hint(capsys):
    name = _uninstalled()
    from reformer_core._registry import install_hint

    assert main(["check", "--backends", name]) == 2
    err = capsys.readouterr().err
    assert repr(name) in err and install_hint(name) in err and "pip install" in err


def test_spec_errors():
    from reformer_core.conformance.targets import spec_errors

    assert spec_errors(["numpy", "strict:device1", "numpy+jit"]) == []  # runnable or skipped with a reason
    assert len(spec_errors(["nosuch", "numpy", "os:getcwd"])) == 2


def test_the_pytest_suite_refuses_an_unknown_backend():
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "--pyargs", "reformer_core.conformance", "-q", "-p", "no:cacheprovider",
         "--backends", "nosuch", "-k", "hashing"],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode not in (0, 5), completed.stdout[-2000:]
    assert "unknown backend 'nosuch'" in completed.stdout


@needs_torch
def test_check_with_only_a_missing_gpu_exits_2(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert main(["check", "--backends", "torch:cuda", "--max-examples", "1"]) == 2
    captured = capsys.readouterr()
    assert "no comparisons ran" in captured.err and "skipped: torch:cuda" in captured.out


def test_bench_fails_before_any_work_on_unknown_uninstalled_or_missing_device(capsys):
    assert main(["bench", "--backends", "numpy,nosuch", "--quick", "--no-progress"]) == 2
    assert "unknown backend 'nosuch'" in capsys.readouterr().err
    assert main(["bench", "--backends", "strict:device9", "--quick", "--no-progress"]) == 2
    assert "device9" in capsys.readouterr().err


def test_bench_with_an_uninstalled_backend_exits_2_with_the_install_hint(capsys):
    name = _uninstalled()
    assert main(["bench", "--backends", name, "--quick", "--no-progress"]) == 2
    assert "pip install" in capsys.readouterr().err


# ---------------------------------------------------------------- 8: the loss


VOCAB = 7


def _logits_targets(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, 5, VOCAB)), rng.integers(0, VOCAB, (2, 5))


def _to(name, array):
    from reformer_core._registry import resolve_backend

    dtype = None if array.dtype.kind in "iub" or name != "jax" else "float32"
    return resolve_backend(name).from_numpy(array, dtype=dtype)


@pytest.mark.parametrize("name", INSTALLED_BACKENDS)
@pytest.mark.parametrize("bad", [-100, -1, VOCAB, VOCAB + 5])
def test_an_out_of_range_target_raises(name, bad):
    logits, targets = _logits_targets()
    targets[1, 2] = bad
    with pytest.raises(ValueError, match=rf"targets must lie in \[0, vocab_size={VOCAB}\), got {bad}.*ignore_index"):
        rc.cross_entropy_loss(_to(name, logits), _to(name, targets))


@pytest.mark.parametrize("name", INSTALLED_BACKENDS)
@pytest.mark.parametrize("ignore", [-100, -1, VOCAB])
def test_ignore_index_gives_those_positions_weight_zero(name, ignore):
    logits, targets = _logits_targets()
    targets[0, 1] = targets[1, 4] = ignore
    weights = (targets != ignore).astype(np.float64)
    expected = rc.cross_entropy_loss(logits, np.where(targets == ignore, 0, targets), weights=weights)
    got = rc.cross_entropy_loss(_to(name, logits), _to(name, targets), ignore_index=ignore)
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-6)
    # and other bad targets still raise
    targets[0, 0] = -5
    with pytest.raises(ValueError, match="got -5"):
        rc.cross_entropy_loss(_to(name, logits), _to(name, targets), ignore_index=ignore)


def test_zero_weights_give_loss_zero_and_zero_gradients_numpy():
    logits, targets = _logits_targets()
    for weights, ignore in [(np.zeros((2, 5)), None), (None, -100), (np.zeros((2, 5), dtype=bool), None)]:
        t = np.full_like(targets, -100) if ignore is not None else targets
        loss, pullback = cross_entropy_loss_vjp(logits, t, weights=weights, ignore_index=ignore)
        assert float(loss) == 0.0
        d_logits = pullback(np.ones(()))
        assert np.all(d_logits == 0)


@needs_torch
def test_zero_weights_give_loss_zero_and_zero_gradients_torch():
    import torch

    logits, targets = _logits_targets()
    x = torch.tensor(logits, requires_grad=True)
    loss = rc.cross_entropy_loss(x, torch.tensor(targets), weights=torch.zeros(2, 5, dtype=torch.float64))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)
    x.grad = None
    loss = rc.cross_entropy_loss(x, torch.full((2, 5), -100), ignore_index=-100)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)


@needs_jax
def test_zero_weights_give_loss_zero_and_zero_gradients_jax():
    import jax
    import jax.numpy as jnp

    logits, targets = _logits_targets()
    x = jnp.asarray(logits, dtype=jnp.float32)
    for fn in (lambda z: rc.cross_entropy_loss(z, jnp.asarray(targets), weights=jnp.zeros((2, 5))),
               lambda z: rc.cross_entropy_loss(z, jnp.full((2, 5), -100), ignore_index=-100)):
        loss, grad = jax.jit(jax.value_and_grad(fn))(x)
        assert float(loss) == 0.0 and bool(jnp.all(grad == 0))


@needs_jax
def test_traced_out_of_range_targets_give_nan_never_a_wrapped_class():
    import jax
    import jax.numpy as jnp

    logits, targets = _logits_targets()
    targets[0, 0] = -1  # would wrap to class VOCAB - 1
    x, t = jnp.asarray(logits, dtype=jnp.float32), jnp.asarray(targets)
    assert np.isnan(float(jax.jit(lambda z, y: rc.cross_entropy_loss(z, y))(x, t)))
    ignored = jax.jit(lambda z, y: rc.cross_entropy_loss(z, y, ignore_index=-1))(x, t)
    expected = rc.cross_entropy_loss(logits, np.where(targets == -1, 0, targets), weights=(targets != -1) * 1.0)
    np.testing.assert_allclose(float(ignored), float(expected), rtol=1e-5)


def _model_inputs(config, backend="numpy"):
    params = rc.init_params(config, seed=2, backend=backend)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, config.vocab_size, (2, 8))
    targets = rng.integers(0, config.vocab_size, (2, 8))
    return params, tokens, targets


def test_value_and_grad_checks_targets_before_any_work(tiny_config):
    params, tokens, targets = _model_inputs(tiny_config)
    targets[0, 3] = -100
    with pytest.raises(ValueError, match=r"got -100.*ignore_index=-100"):
        rc.value_and_grad(params, tokens, targets, tiny_config)
    loss, grads = rc.value_and_grad(params, tokens, targets, tiny_config, ignore_index=-100)
    weights = (targets != -100).astype(np.float64)
    expected, expected_grads = rc.value_and_grad(params, tokens, np.where(targets < 0, 0, targets), tiny_config,
                                                 weights=weights)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-12)
    for (_, a), (_, b) in zip(rc.tree_paths(grads), rc.tree_paths(expected_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reversible", [True, False])
def test_value_and_grad_with_zero_weights_is_zero_not_nan(tiny_config, reversible):
    params, tokens, targets = _model_inputs(tiny_config)
    loss, grads = rc.value_and_grad(params, tokens, targets, tiny_config, weights=np.zeros((2, 8)),
                                    reversible=reversible)
    assert float(loss) == 0.0
    assert all(np.all(np.asarray(g) == 0) for g in rc.tree_leaves(grads))


@needs_torch
def test_torch_model_loss_with_zero_weights_has_zero_gradients(tiny_config):
    import torch

    from reformer_core.backends.torch.nn import ReformerLM

    model = ReformerLM(tiny_config, seed=2)
    _, tokens, targets = _model_inputs(tiny_config)
    logits = model(torch.tensor(tokens))
    loss = rc.cross_entropy_loss(logits, torch.tensor(targets), weights=torch.zeros(2, 8))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or bool(torch.all(p.grad == 0)) for p in model.parameters())
    with pytest.raises(ValueError, match="got -100"):
        rc.cross_entropy_loss(logits, torch.full((2, 8), -100))


@needs_jax
def test_jax_model_loss_ignore_index_and_zero_weights(tiny_config):
    import jax
    import jax.numpy as jnp

    from reformer_core.backends.jax import model as jax_model

    params, tokens, targets = _model_inputs(tiny_config, backend="jax")
    randomness = jax_model.step_randomness(tiny_config, 0, batch=2, length=8, like=params)
    tokens, masked = jnp.asarray(tokens), jnp.asarray(np.where(np.arange(8) < 2, -100, targets))
    step = jax.jit(jax_model.loss_and_grad, static_argnames=("config", "ignore_index"))
    loss, grads = step(params, tokens, masked, tiny_config, ignore_index=-100, **randomness)
    expected, _ = step(params, tokens, jnp.asarray(np.where(np.arange(8) < 2, 0, targets)), tiny_config,
                       weights=jnp.asarray(np.broadcast_to(np.arange(8) >= 2, (2, 8)) * 1.0), **randomness)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    loss, grads = step(params, tokens, jnp.asarray(targets), tiny_config, weights=jnp.zeros((2, 8)), **randomness)
    assert float(loss) == 0.0 and all(bool(jnp.all(g == 0)) for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match="got -100"):  # eager: concrete targets are checked
        jax_model.loss(params, tokens, masked, tiny_config, **randomness)


# ---------------------------------------------------------------- 9: parameters are floating


@pytest.mark.parametrize("name", INSTALLED_BACKENDS)
@pytest.mark.parametrize("dtype", ["int32", "int64", "bool", "uint8"])
def test_init_params_refuses_non_floating_dtypes(tiny_config, name, dtype):
    with pytest.raises(TypeError, match=r"floating dtype, one of float16, bfloat16, float32, float64"):
        rc.init_params(tiny_config, backend=name, dtype=dtype)


@pytest.mark.parametrize("name", INSTALLED_BACKENDS)
def test_init_params_refuses_integer_dtype_objects(tiny_config, name):
    from reformer_core._registry import resolve_backend

    with pytest.raises(TypeError, match="floating dtype"):
        rc.init_params(tiny_config, backend=name, dtype=resolve_backend(name).dtype("int32"))


def test_init_params_refuses_another_frameworks_dtype(tiny_config):
    if not HAS_TORCH:
        pytest.skip("needs PyTorch for a foreign dtype object")
    import torch

    with pytest.raises(TypeError, match="not a dtype of backend 'numpy'; pass its name 'float64'"):
        rc.init_params(tiny_config, backend="numpy", dtype=torch.float64)


def test_unknown_dtype_names_are_value_errors(tiny_config):
    with pytest.raises(ValueError, match="unknown name 'float8'"):
        rc.init_params(tiny_config, backend="numpy", dtype="float8")


def test_load_checkpoint_refuses_integer_dtypes_before_reading(tmp_path):
    missing = tmp_path / "never-read.npz"  # the dtype is checked first: no FileNotFoundError
    with pytest.raises(TypeError, match="floating dtype"):
        rc.load_checkpoint(missing, dtype="int32")


def test_a_checkpoint_with_integer_params_is_refused(checkpoint, tmp_path, tiny_config):
    path = tmp_path / "ints.npz"
    with np.load(checkpoint) as archive:
        entries = {key: archive[key] for key in archive.files}
    for key in entries:
        if key.startswith("params/"):
            entries[key] = entries[key].astype(np.int32)
    np.savez(path, **entries)
    with pytest.raises(ValueError, match="params have dtype int32; parameters must be floating"):
        rc.load_checkpoint(path, backend="numpy")


def test_apply_refuses_integer_params(tiny_config):
    params = rc.tree_map(lambda a: a.astype(np.int64), rc.init_params(tiny_config, backend="numpy"))
    with pytest.raises(TypeError, match="params have dtype int64; parameters must be floating"):
        rc.apply(params, np.zeros((1, 8), dtype=np.int64), tiny_config)


@needs_torch
@pytest.mark.parametrize("dtype", ["int32", "float8_e4m3fn", "bool", "str"])
def test_torch_reformer_lm_refuses_non_floating_dtypes(tiny_config, dtype):
    import torch

    from reformer_core.backends.torch.nn import ReformerLM

    value = "float32" if dtype == "str" else getattr(torch, dtype, None)
    if value is None:
        pytest.skip(f"this torch has no {dtype}")
    with pytest.raises(TypeError, match="torch.float16, torch.bfloat16, torch.float32, torch.float64"):
        ReformerLM(tiny_config, dtype=value)


@needs_torch
def test_torch_reformer_lm_accepts_the_floating_dtypes(tiny_config):
    import torch

    from reformer_core.backends.torch.nn import ReformerLM

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert ReformerLM(tiny_config, dtype=dtype).parameter_tree()["output"]["bias"].dtype == dtype


# ---------------------------------------------------------------- the documentation says so


def test_the_guide_documents_the_new_rules():
    guide = open(os.path.join(os.path.dirname(__file__), "..", "docs", "guide.md"), encoding="utf-8").read()
    for phrase in ("ignore_index", "zero gradients", "subclass of `reformer_core.backends.Backend`", "exit"):
        assert phrase in guide, phrase
