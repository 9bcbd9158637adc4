"""Every public entry point rejects bad input with a ValueError/TypeError that names the problem.

One test (or one parametrised case) per kind of mistake; each checks the exception type and,
with ``match``, that the message says what is wrong (and, where there is one, how to fix it).
"""

from __future__ import annotations

import importlib.util
import re

import array_api_strict as xs
import numpy as np
import pytest
from array_api_compat import numpy as np_xp

import reformer_core as rc
from reformer_core._arrays import check_finite

BATCH, HEADS, LENGTH, HEAD_DIM = 1, 2, 8, 4
CHUNK = 4
NUM_HASHES = 2


@pytest.fixture
def qk(rng):
    return rng.standard_normal((BATCH, HEADS, LENGTH, HEAD_DIM))


@pytest.fixture
def v(rng):
    return rng.standard_normal((BATCH, HEADS, LENGTH, HEAD_DIM))


@pytest.fixture
def rotations(qk):
    return rc.random_rotations(0, HEADS, HEAD_DIM, NUM_HASHES, 4, like=qk)


def lsh(qk, v, rotations, **kwargs):
    kwargs = {"num_buckets": 4, "chunk_length": CHUNK, **kwargs}
    return rc.lsh_attention(qk, v, rotations, **kwargs)


def tokens(batch=2, length=8, value=0, dtype=np.int64):
    return np.full((batch, length), value, dtype=dtype)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("which", ["qk", "v"])
@pytest.mark.parametrize("rank", [3, 5])
def test_wrong_rank(qk, v, rotations, which, rank):
    bad = qk[0] if rank == 3 else qk[None]
    args = {"qk": qk, "v": v, which: bad}
    with pytest.raises(ValueError, match=rf"{which} must have 4 dimensions \(batch, heads, length, head_dim\)"):
        lsh(args["qk"], args["v"], rotations)


def test_qk_and_v_shapes_differ(qk, v, rotations):
    with pytest.raises(ValueError, match=r"v has shape \(1, 2, 8, 3\) but qk has \(1, 2, 8, 4\); they must match"):
        lsh(qk, v[..., :3], rotations)


@pytest.mark.parametrize("attention", ["lsh", "local"])
def test_length_not_a_multiple_of_chunk_length(qk, v, rotations, attention):
    with pytest.raises(ValueError, match=r"sequence length 8 is not a multiple of chunk_length=3.*pad_to_multiple"):
        if attention == "lsh":
            lsh(qk, v, rotations, chunk_length=3)
        else:
            rc.local_attention(qk, qk, v, chunk_length=3)


@pytest.mark.parametrize("chunk_length", [0, -4])
def test_non_positive_chunk_length(qk, v, rotations, chunk_length):
    with pytest.raises(ValueError, match=rf"chunk_length must be an int >= 1, got {chunk_length}"):
        lsh(qk, v, rotations, chunk_length=chunk_length)


@pytest.mark.parametrize("chunk_length", [4.0, "4", True])
def test_non_int_chunk_length(qk, v, rotations, chunk_length):
    with pytest.raises(TypeError, match=r"chunk_length must be an int, got"):
        lsh(qk, v, rotations, chunk_length=chunk_length)


def test_negative_num_chunks_before(qk, v, rotations):
    with pytest.raises(ValueError, match=r"num_chunks_before must be an int >= 0, got -1"):
        lsh(qk, v, rotations, num_chunks_before=-1)


# ---------------------------------------------------------------- buckets


def test_odd_bucket_count(qk, v, rotations):
    with pytest.raises(ValueError, match=r"num_buckets factors must be even and >= 2.*got 5; use e\.g\. 6"):
        lsh(qk, v, rotations, num_buckets=5)


def test_odd_bucket_factor_in_tuple(qk, v, rotations):
    with pytest.raises(ValueError, match=r"must be even and >= 2.*got \(2, 3\)"):
        lsh(qk, v, rotations, num_buckets=(2, 3))


def test_bucket_count_below_two(qk, v, rotations):
    with pytest.raises(ValueError, match=r"must be even and >= 2.*got 0"):
        lsh(qk, v, rotations, num_buckets=0)


def test_empty_bucket_tuple(qk, v, rotations):
    with pytest.raises(ValueError, match=r"num_buckets must not be an empty tuple"):
        lsh(qk, v, rotations, num_buckets=())


def test_list_instead_of_tuple_for_factors(qk, v, rotations):
    with pytest.raises(TypeError, match=re.escape("got a list; use tuple([2, 2])")):
        lsh(qk, v, rotations, num_buckets=[2, 2])


def test_num_buckets_none_in_attention(qk, v, rotations):
    with pytest.raises(TypeError, match=r"num_buckets must hold ints, got None"):
        lsh(qk, v, rotations, num_buckets=None)


@pytest.mark.parametrize(
    "shape_change",
    ["heads", "head_dim", "num_buckets"],
)
def test_rotations_do_not_fit(qk, v, rotations, shape_change):
    if shape_change == "heads":
        call = lambda: lsh(qk, v, rotations[:1])  # noqa: E731
    elif shape_change == "head_dim":
        call = lambda: lsh(qk, v, rotations[:, :3])  # noqa: E731
    else:  # rotations drawn for 4 buckets, used with 8
        call = lambda: lsh(qk, v, rotations, num_buckets=8)  # noqa: E731
    with pytest.raises(ValueError, match=r"rotations of shape .* do not fit x of shape \(1, 2, 8, 4\).*random_rotations"):
        call()


def test_hash_vectors_rotations_do_not_fit(qk, rotations):
    with pytest.raises(ValueError, match=r"do not fit .* num_buckets=\(2, 4\); expected \(2, 4, num_hashes, 3\)"):
        rc.hash_vectors(qk, rotations, (2, 4))


# ---------------------------------------------------------------- dtypes


def test_mismatched_float_dtypes(qk, v, rotations):
    with pytest.raises(TypeError, match=r"inputs must share one floating dtype, got qk: float64, v: float32"):
        lsh(qk, v.astype(np.float32), rotations)


def test_rotations_dtype_differs_from_qk(qk, v, rotations):
    with pytest.raises(TypeError, match=r"share one floating dtype, got x: float64, rotations: float32"):
        lsh(qk, v, rotations.astype(np.float32))


def test_integer_qk(qk, v, rotations):
    as_int = qk.astype(np.int64)
    with pytest.raises(TypeError, match=r"qk must have a real floating dtype, got int64"):
        lsh(as_int, as_int, rotations)


# ---------------------------------------------------------------- frameworks and devices


def test_two_frameworks_mixed(qk, v, rotations):
    with pytest.raises(TypeError, match=r"different frameworks were mixed: \['numpy', 'strict'\]"):
        lsh(qk, xs.asarray(v), rotations)


def test_not_an_array(qk, rotations):
    with pytest.raises(TypeError, match=r"expected arrays of a supported framework.*got builtins\.list"):
        lsh(qk, qk.tolist(), rotations)


def test_arrays_on_two_devices(qk, v):
    on_device1 = xs.asarray(qk, device=xs.Device("device1"))
    on_cpu = xs.asarray(v)
    with pytest.raises(ValueError, match=r"inputs live on different devices \(qk on .*device1.*v on .*CPU_DEVICE"):
        rc.full_attention(on_device1, on_cpu)


def test_rotations_on_another_device(qk, v):
    device1 = xs.Device("device1")
    rotations = rc.random_rotations(0, HEADS, HEAD_DIM, NUM_HASHES, 4, like=xs.asarray(qk))  # on CPU
    with pytest.raises(ValueError, match=r"different devices .*rotations on .*CPU_DEVICE"):
        lsh(xs.asarray(qk, device=device1), xs.asarray(v, device=device1), rotations)


def test_backend_for_arrays_on_two_devices():
    with pytest.raises(ValueError, match=r"inputs live on different devices"):
        rc.backend_for(xs.ones(2, device=xs.Device("device1")), xs.ones(2))


# ---------------------------------------------------------------- backends


def test_unknown_backend_name(restore_backend):
    with pytest.raises(ValueError, match=r"unknown backend 'tensorflow'; known backends: numpy, strict, torch, jax, cupy"):
        rc.set_backend("tensorflow")


def test_unknown_backend_in_environment(restore_backend, monkeypatch):
    monkeypatch.setenv("REFORMER_BACKEND", "mxnet")
    with pytest.raises(ValueError, match=r"unknown backend 'mxnet'; known backends"):
        rc.get_backend()


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="cupy is installed here")
def test_backend_framework_not_installed(restore_backend):
    with pytest.raises(ValueError, match=re.escape("needs cupy, which is not installed; run pip install 'reformer-core[cupy]'")):
        with rc.use_backend("cupy"):
            pass


def test_backend_name_not_a_string(restore_backend):
    with pytest.raises(TypeError, match=r"backend name must be a string"):
        rc.set_backend(3)


def test_unknown_device_of_backend(restore_backend):
    with pytest.raises(ValueError, match=r"backend 'strict' has no device 'device9'; available: .*device1"):
        rc.set_backend("strict:device9")


def test_device_given_twice(restore_backend):
    with pytest.raises(ValueError, match=r"already names a device; do not also pass device="):
        rc.set_backend("strict:device1", device="device2")


def test_backend_that_is_neither_name_nor_object(tiny_config):
    with pytest.raises(TypeError, match=r"backend must be a name .* or a backend object .*got int"):
        rc.init_params(tiny_config, backend=3)
    with pytest.raises(TypeError, match=r"backend must be a name .* or a backend object .*got int"):
        rc.random_rotations(0, HEADS, HEAD_DIM, NUM_HASHES, 4, backend=3)


def test_backend_given_by_name(tiny_config):
    params = rc.init_params(tiny_config, backend="strict:device1")
    assert "device1" in str(params["output"]["weight"].device)
    with pytest.raises(ValueError, match=r"unknown backend 'nosuch'"):
        rc.random_rotations(0, HEADS, HEAD_DIM, NUM_HASHES, 4, backend="nosuch")


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("shape", [(1, 7), (2, 8)])
def test_attention_mask_wrong_shape(qk, v, rotations, shape):
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, length\) = \(1, 8\)"):
        lsh(qk, v, rotations, attention_mask=np.ones(shape, dtype=bool))


def test_attention_mask_wrong_rank(qk, v, rotations):
    with pytest.raises(ValueError, match=r"attention_mask must have 2 dimensions"):
        lsh(qk, v, rotations, attention_mask=np.ones((1, 1, 8), dtype=bool))


def test_attention_mask_float_dtype(qk, v, rotations):
    with pytest.raises(TypeError, match=r"attention_mask must be bool or integer .*got float64"):
        lsh(qk, v, rotations, attention_mask=np.ones((1, 8)))


# ---------------------------------------------------------------- dropout


@pytest.mark.parametrize("rate", [1.0, 1.5, -0.1])
def test_dropout_rate_out_of_range(qk, v, rotations, rate):
    keep = np.ones((BATCH, HEADS, NUM_HASHES * LENGTH // CHUNK, CHUNK, 2 * CHUNK), dtype=bool)
    with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\)"):
        lsh(qk, v, rotations, dropout_rate=rate, dropout_keep=keep)


def test_dropout_keep_wrong_shape(qk, v, rotations):
    keep = np.ones((BATCH, HEADS, 3, CHUNK, 2 * CHUNK), dtype=bool)
    with pytest.raises(ValueError, match=r"dropout_keep has shape \(1, 2, 3, 4, 8\), .* shape \(1, 2, 4, 4, 8\)"):
        lsh(qk, v, rotations, dropout_rate=0.5, dropout_keep=keep)


def test_dropout_keep_not_bool(qk, v):
    with pytest.raises(TypeError, match=r"dropout_keep must be a bool mask .*float64"):
        rc.full_attention(qk, v, dropout_rate=0.5, dropout_keep=np.ones((BATCH, HEADS, LENGTH, LENGTH)))


# ---------------------------------------------------------------- finiteness


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite_numpy(bad):
    array = np.array([[1.0, bad], [2.0, 3.0]])
    with pytest.raises(ValueError, match=r"qk contains NaN or inf"):
        check_finite(np_xp, "qk", array)
    check_finite(np_xp, "qk", np.array([1.0, 2.0]))  # finite: no error


def test_check_finite_strict():
    with pytest.raises(ValueError, match=r"v contains NaN or inf"):
        check_finite(xs, "v", xs.asarray([0.0, float("nan")]))


# ---------------------------------------------------------------- rotations


def test_random_rotations_negative_seed():
    with pytest.raises(ValueError, match=r"seed must be non-negative, got -1"):
        rc.random_rotations(-1, HEADS, HEAD_DIM, NUM_HASHES, 4)


def test_random_rotations_float_seed():
    with pytest.raises(TypeError, match=r"seed must be an int \(or a tuple of ints\), got float"):
        rc.random_rotations(1.5, HEADS, HEAD_DIM, NUM_HASHES, 4)


def test_random_rotations_negative_seed_in_tuple():
    with pytest.raises(ValueError, match=r"seed tuple entries must be non-negative ints, got \(1, -2\)"):
        rc.random_rotations((1, -2), HEADS, HEAD_DIM, NUM_HASHES, 4)


def test_random_rotations_zero_heads():
    with pytest.raises(ValueError, match=r"num_heads must be a positive int, got 0"):
        rc.random_rotations(0, 0, HEAD_DIM, NUM_HASHES, 4)


def test_random_rotations_unknown_dtype_name():
    with pytest.raises(ValueError, match=r"unknown dtype name 'float8'"):
        rc.random_rotations(0, HEADS, HEAD_DIM, NUM_HASHES, 4, dtype="float8")


# ---------------------------------------------------------------- the model


@pytest.fixture
def params(tiny_config):
    return rc.init_params(tiny_config, backend=rc.get_backend())


def test_apply_float_tokens(params, tiny_config):
    with pytest.raises(TypeError, match=r"tokens must be integers, got float32.*astype"):
        rc.apply(params, tokens(dtype=np.float32), tiny_config)


def test_apply_tokens_wrong_rank(params, tiny_config):
    with pytest.raises(ValueError, match=r"tokens must have shape \(batch, length\), got \(8,\)"):
        rc.apply(params, tokens()[0], tiny_config)


@pytest.mark.parametrize("value", [16, -1])
def test_apply_token_out_of_vocabulary(params, tiny_config, value):
    with pytest.raises(ValueError, match=rf"token ids must lie in \[0, vocab_size=16\), got values in \[{value}, {value}\]"):
        rc.apply(params, tokens(value=value), tiny_config)


def test_apply_sequence_longer_than_axial_capacity(params, tiny_config):
    with pytest.raises(ValueError, match=r"sequence length 20 exceeds .*prod\(axial_pos_shape\)=16; enlarge axial_pos_shape"):
        rc.apply(params, tokens(length=20), tiny_config)


def test_apply_length_not_a_multiple_of_chunk_length(params, tiny_config):
    with pytest.raises(ValueError, match=r"sequence length 6 is not a multiple of lsh_chunk_length=4; pad it .*pad_to_multiple"):
        rc.apply(params, tokens(length=6), tiny_config)


def test_apply_params_of_another_config_shape(params, tiny_config):
    wider = tiny_config.replace(d_model=12)
    with pytest.raises(ValueError, match=r"parameter embedding/tokens has shape \(16, 8\), but the config needs \(16, 12\); were these params made for another config"):
        rc.apply(params, tokens(), wider)


def test_apply_params_of_another_config_structure(params, tiny_config):
    fewer_layers = tiny_config.replace(attention_layers=("lsh",))
    with pytest.raises(ValueError, match=r"params do not match the config's structure: trees differ at layers"):
        rc.apply(params, tokens(), fewer_layers)


def test_apply_config_not_a_config(params):
    with pytest.raises(TypeError, match=r"config must be a ReformerConfig, got dict"):
        rc.apply(params, tokens(), {"vocab_size": 16})


def test_apply_attention_mask_wrong_shape(params, tiny_config):
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, length\) = \(2, 8\), got \(2, 7\)"):
        rc.apply(params, tokens(), tiny_config, attention_mask=np.ones((2, 7), dtype=bool))


def test_apply_rotations_one_per_layer(params, tiny_config):
    with pytest.raises(ValueError, match=r"rotations must have one entry per layer \(2\), got 1"):
        rc.apply(params, tokens(), tiny_config, rotations=[None])


def test_apply_tokens_and_params_on_two_devices(tiny_config, restore_backend):
    params = rc.init_params(tiny_config, backend=rc.set_backend("strict:device1"))
    with pytest.raises(ValueError, match=r"different devices \(tokens on .*CPU_DEVICE.*params on .*device1"):
        rc.apply(params, xs.asarray(tokens()), tiny_config)


def test_apply_tokens_of_another_framework(params, tiny_config):
    with pytest.raises(TypeError, match=r"different frameworks were mixed"):
        rc.apply(params, xs.asarray(tokens()), tiny_config)


def test_init_params_negative_seed(tiny_config):
    with pytest.raises(ValueError, match=r"seed must be a non-negative int, got -1"):
        rc.init_params(tiny_config, seed=-1)


def test_pad_to_multiple_non_positive(qk):
    with pytest.raises(ValueError, match=r"multiple must be a positive int, got 0"):
        rc.pad_to_multiple(qk[0], 0)


# ---------------------------------------------------------------- configuration

BASE = {"vocab_size": 16, "d_model": 8, "num_heads": 2, "head_dim": 4, "d_ff": 16, "axial_pos_shape": (4, 4)}


CONFIG_CASES = [
    ({"attention_layers": ("lsh", "sparse")}, ValueError, r"unknown kind 'sparse'; use one of \('lsh', 'local', 'full'\)"),
    ({"attention_layers": "lsh"}, TypeError, r"attention_layers must be a tuple of kinds"),
    ({"attention_layers": ()}, ValueError, r"attention_layers must name at least one layer"),
    ({"axial_pos_dims": (3, 4)}, ValueError, r"axial_pos_dims \(3, 4\) must sum to d_model=8"),
    ({"axial_pos_dims": (8,)}, ValueError, r"needs one width per axial_pos_shape axis"),
    ({"hidden_dropout": 1.0}, ValueError, r"hidden_dropout must be a float in \[0, 1\), got 1\.0"),
    ({"attention_dropout": -0.5}, ValueError, r"attention_dropout must be a float in \[0, 1\)"),
    ({"lsh_chunk_length": -4}, ValueError, r"lsh_chunk_length must be >= 1, got -4"),
    ({"lsh_chunk_length": 4.0}, TypeError, r"lsh_chunk_length must be an int, got float"),
    ({"local_chunk_length": 0}, ValueError, r"local_chunk_length must be >= 1, got 0"),
    ({"num_buckets": 7}, ValueError, r"num_buckets factors must be even"),
    ({"num_buckets": [4, 4]}, TypeError, r"got a list; use tuple"),
    ({"ff_activation": "tanh"}, ValueError, r"ff_activation 'tanh' is unknown"),
    ({"causal": 1}, TypeError, r"causal must be a bool, got 1"),
    ({"vocab_size": 0}, ValueError, r"vocab_size must be >= 1, got 0"),
    ({"lsh_num_chunks_before": -1}, ValueError, r"lsh_num_chunks_before must be >= 0"),
    ({"layer_norm_eps": 0.0}, ValueError, r"layer_norm_eps must be a positive float"),
    ({"axial_pos_shape": [4, 4]}, TypeError, r"axial_pos_shape must be a non-empty tuple of ints"),
]


@pytest.mark.parametrize(
    "changes, error, message",
    CONFIG_CASES,
    ids=[",".join(f"{k}={v!r}" for k, v in changes.items()) for changes, _, _ in CONFIG_CASES],
)
def test_invalid_config_field(changes, error, message):
    with pytest.raises(error, match=message):
        rc.ReformerConfig(**{**BASE, **changes})


def test_config_from_dict_unknown_field():
    with pytest.raises(ValueError, match=r"unknown ReformerConfig fields \['num_layers'\]"):
        rc.ReformerConfig.from_dict({**BASE, "num_layers": 3})


@pytest.mark.parametrize("length, chunk_length", [(0, 4), (8, 0)])
def test_default_num_buckets_non_positive(length, chunk_length):
    with pytest.raises(ValueError, match=r"(length|chunk_length) must be >= 1, got 0"):
        rc.default_num_buckets(length, chunk_length)


# ---------------------------------------------------------------- flags, finiteness, short sequences


def test_rotations_checked_even_when_one_chunk_holds_the_sequence(qk, v):
    wrong = rc.random_rotations(0, HEADS, HEAD_DIM, NUM_HASHES, 8, like=qk)
    with pytest.raises(ValueError, match=r"rotations of shape .* do not fit"):
        lsh(qk, v, wrong, chunk_length=LENGTH * 2)


@pytest.mark.parametrize("fn", ["lsh", "full", "local"])
def test_causal_must_be_a_bool(qk, v, rotations, fn):
    call = {
        "lsh": lambda: lsh(qk, v, rotations, causal="no"),
        "full": lambda: rc.full_attention(qk, v, causal=1),
        "local": lambda: rc.local_attention(qk, qk, v, chunk_length=CHUNK, causal=None),
    }[fn]
    with pytest.raises(TypeError, match=r"causal must be True or False"):
        call()


def test_duplicate_correction_must_be_a_bool(qk, v, rotations):
    with pytest.raises(TypeError, match=r"duplicate_correction must be True or False"):
        lsh(qk, v, rotations, duplicate_correction="yes")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_check_finite_on_request(qk, v, rotations, bad):
    v = v.copy()
    v[0, 1, 3, 2] = bad
    with np.errstate(invalid="ignore"):
        assert not np.isfinite(lsh(qk, v, rotations)).all()  # not checked unless asked
    with pytest.raises(ValueError, match=r"v contains NaN or inf"):
        lsh(qk, v, rotations, check_finite=True)
    with pytest.raises(ValueError, match=r"v contains NaN or inf"):
        rc.full_attention(qk, v, check_finite=True)
    with pytest.raises(ValueError, match=r"v contains NaN or inf"):
        rc.local_attention(qk, qk, v, chunk_length=CHUNK, check_finite=True)
