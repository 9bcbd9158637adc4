"""The CuPy backend: runs only where CuPy and a CUDA device are present (skips with the reason)."""

import importlib.util

import numpy as np
import pytest

import reformer_core as rc


def _cuda_devices() -> int:
    if importlib.util.find_spec("cupy") is None:
        return 0
    import cupy

    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # driver missing or broken: no usable device
        return 0


def test_cupy_is_registered_without_importing_it():
    assert "cupy" in rc.known_backends()
    if importlib.util.find_spec("cupy") is None:
        assert "cupy" not in rc.available_backends()
        with pytest.raises(ValueError, match=r"pip install 'reformer-core\[cupy\]'"):
            rc.set_backend("cupy")


pytestmark_gpu = pytest.mark.skipif(_cuda_devices() == 0, reason="needs CuPy and a CUDA device")


@pytestmark_gpu
def test_round_trip_and_placement():
    with rc.use_backend("cupy") as backend:
        x = np.random.default_rng(0).standard_normal((3, 4))
        on_gpu = backend.from_numpy(x, dtype="float32")
        assert type(on_gpu).__module__.startswith("cupy")
        np.testing.assert_array_equal(backend.to_numpy(on_gpu), x.astype(np.float32))
        assert rc.backend_for(on_gpu).name == "cupy"
        assert backend.memory_in_use() > 0


@pytestmark_gpu
def test_lsh_attention_matches_numpy():
    import cupy

    rng = np.random.default_rng(0)
    qk, v = rng.standard_normal((2, 2, 64, 16)), rng.standard_normal((2, 2, 64, 16))
    rotations = rc.random_rotations(0, 2, 16, 2, 8, dtype="float64")
    kwargs = dict(num_buckets=8, chunk_length=16, causal=True)
    expected = rc.lsh_attention(qk, v, rotations, **kwargs)
    got = rc.lsh_attention(cupy.asarray(qk), cupy.asarray(v), cupy.asarray(rotations), **kwargs)
    assert isinstance(got, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(got), expected, rtol=1e-10, atol=1e-12)


@pytestmark_gpu
def test_training_step_stays_on_the_gpu():
    import cupy

    from reformer_core import Adam, tree_leaves, value_and_grad

    config = rc.ReformerConfig(vocab_size=16, d_model=16, num_heads=2, head_dim=8, d_ff=32,
                               attention_layers=("lsh", "local"), lsh_chunk_length=8, local_chunk_length=8,
                               axial_pos_shape=(4, 8))
    params = rc.init_params(config, 0, backend="cupy")
    tokens = cupy.asarray(np.random.default_rng(0).integers(0, 16, (2, 32)))
    loss, grads = value_and_grad(params, tokens, tokens, config)
    optimizer = Adam(1e-3)
    params, state = optimizer.update(params, grads, optimizer.init(params))
    assert all(isinstance(leaf, cupy.ndarray) for leaf in tree_leaves(params) + tree_leaves(grads))
    assert np.isfinite(float(loss))
