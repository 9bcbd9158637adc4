"""The torch backend's fused position-wise ops (backends/torch/layer_ops.py: linear, relu,
layer_norm) against the standard Array-API path: values and autograd gradients over drawn
shapes and dtypes, the edge values the core's rules pin down (relu at 0, NaN, inf), and the
mixed-dtype inputs that must keep the standard path. Also the signed argmax that hashing
uses instead of concatenating ``[p, -p]``, on every installed backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reformer_core as rc
from reformer_core._attention import hashing
from reformer_core._model import layers
from reformer_core.conformance.tolerances import tolerance_for

torch = pytest.importorskip("torch", reason="the fused layer ops are torch's (pip install 'reformer-core[torch]')")
import array_api_compat.torch as xp  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _both(fn, *arrays):
    """``fn``'s value and the gradients of ``sum(value * cotangent)`` for the fused and the standard path."""
    results = []
    for standard in (False, True):
        leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in arrays]
        with rc.standard_path(standard):
            out = fn(*leaves)
        cotangent = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape).to(out.dtype)
        grads = torch.autograd.grad(out, [a for a in leaves if a.requires_grad], cotangent, allow_unused=True)
        results.append((out.detach(), grads))
    return results


def _close(fast, standard, dtype, quantity):
    tol = tolerance_for(dtype, "torch", "cpu")
    scale = float(standard.double().abs().max()) if standard.numel() else 0.0
    error = float((fast.double() - standard.double()).abs().max()) if standard.numel() else 0.0
    assert error <= tol.bound(quantity, scale), f"{quantity}: fused differs from standard by {error:.3g}"


def _check(fn, dtype, *arrays):
    (fast, fast_grads), (standard, standard_grads) = _both(fn, *arrays)
    assert fast.dtype == standard.dtype and fast.shape == standard.shape
    _close(fast, standard, dtype, "forward")
    for a, b in zip(fast_grads, standard_grads):
        _close(a, b, dtype, "grad")


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), lead=st.sampled_from([(3,), (2, 5), (1, 2, 3)]), d_in=st.integers(1, 9),
       d_out=st.integers(1, 9), with_bias=st.booleans(), dtype=st.sampled_from(["float64", "float32", "bfloat16"]))
def test_dense_matches_the_standard_path(seed, lead, d_in, d_out, with_bias, dtype):
    g = torch.Generator().manual_seed(seed)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64).to(DTYPES[dtype])
               for s in ((*lead, d_in), (d_in, d_out), (d_out,)))
    if with_bias:
        _check(lambda x, w, b: layers.dense(xp, x, {"weight": w, "bias": b}), dtype, x, w, b)
    else:
        _check(lambda x, w: layers.dense(xp, x, {"weight": w}), dtype, x, w)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), shape=st.sampled_from([(1, 1), (2, 7), (2, 3, 16)]),
       eps=st.sampled_from([1e-12, 1e-6, 1e-2]), dtype=st.sampled_from(["float64", "float32", "bfloat16"]))
def test_layer_norm_matches_the_standard_path(seed, shape, eps, dtype):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(*shape, generator=g, dtype=torch.float64) + 1).to(DTYPES[dtype])
    scale, bias = (torch.randn(shape[-1], generator=g, dtype=torch.float64).to(DTYPES[dtype]) for _ in range(2))
    _check(lambda x, s, b: layers.layer_norm(xp, x, {"scale": s, "bias": b}, eps), dtype, x, scale, bias)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_relu_matches_the_standard_path_at_its_edges(dtype):
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0, float("inf"), -float("inf"), float("nan")], dtype=DTYPES[dtype])
    (fast, (fast_grad,)), (standard, (standard_grad,)) = _both(lambda x: layers.activation(xp, "relu", x), x)
    assert torch.equal(torch.isnan(fast), torch.isnan(standard)) and bool(torch.isnan(fast[-1]))
    finite = ~torch.isnan(standard)
    assert torch.equal(fast[finite], standard[finite])
    assert torch.equal(fast_grad[:-1], standard_grad[:-1])  # 0 at x == 0 on both; the NaN's gradient is NaN's business
    assert float(fast_grad[2]) == 0.0 and float(fast_grad[4]) != 0.0


def test_the_fused_ops_run_by_default_and_not_on_the_standard_path(monkeypatch):
    from reformer_core.backends.torch import adapter

    calls = []
    for name in ("native_dense", "native_relu", "native_layer_norm"):
        original = getattr(adapter.TorchBackend, name)
        monkeypatch.setattr(adapter.TorchBackend, name,
                            staticmethod(lambda *a, _o=original, _n=name: calls.append(_n) or _o(*a)))
    x = torch.randn(2, 3, 4)
    params = {"dense_in": {"weight": torch.randn(4, 8), "bias": torch.randn(8)},
              "dense_out": {"weight": torch.randn(8, 4), "bias": torch.randn(4)}}
    norm = {"scale": torch.ones(4), "bias": torch.zeros(4)}
    layers.feed_forward(xp, layers.layer_norm(xp, x, norm, 1e-6), params)
    assert calls == ["native_layer_norm", "native_dense", "native_relu", "native_dense"]
    calls.clear()
    with rc.standard_path():
        layers.feed_forward(xp, layers.layer_norm(xp, x, norm, 1e-6), params)
    assert calls == []


def test_mixed_dtypes_keep_the_standard_path():
    # F.linear would raise on float32 @ float64; the standard path promotes as it always did
    x, w = torch.randn(2, 3, dtype=torch.float32), torch.randn(3, 4, dtype=torch.float64)
    with rc.standard_path():
        expected = layers.dense(xp, x, {"weight": w})
    got = layers.dense(xp, x, {"weight": w})
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def _signed_argmax_reference(p):
    return np.argmax(np.concatenate([p, -p], axis=-1), axis=-1)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16), half=st.integers(1, 8), specials=st.booleans(),
    concat_below=st.sampled_from([0, 10**9]),
)
def test_signed_argmax_equals_the_argmax_of_the_concatenation(seed, half, specials, concat_below):
    # both branches: the reductions (threshold 0) and the concatenation (every size below it)
    rng = np.random.default_rng(seed)
    p = rng.integers(-3, 4, (2, 3, half)).astype(np.float64)  # small integers: ties everywhere
    if specials:
        p[0, 0, rng.integers(half)] = np.nan
        p[0, 1, :] = np.inf
        p[1, 0, rng.integers(half)] = -np.inf
    expected = _signed_argmax_reference(p)
    previous, hashing._CONCAT_BELOW = hashing._CONCAT_BELOW, concat_below
    try:
        _compare_signed_argmax(p, expected)
    finally:
        hashing._CONCAT_BELOW = previous


def _compare_signed_argmax(p, expected):
    import array_api_compat.numpy as np_xp

    assert np.array_equal(np.asarray(hashing._signed_argmax(np_xp, p)), expected)
    assert np.array_equal(hashing._signed_argmax(xp, torch.from_numpy(p)).numpy(), expected)
