"""The JAX backend: adapter, vjp, jit/vmap of the core, the custom_vjp reversible stack, the
jit-friendly model, randomness per step, and data-parallel sharding over two CPU devices.

float64 runs inside ``jax.enable_x64(True)`` blocks (the global switch is left alone); the
sharded test runs in a subprocess because the device count must be set before jax starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="the jax backend needs jax (pip install 'reformer-core[jax]')")
jnp = pytest.importorskip("jax.numpy")
import jax.test_util  # noqa: E402  (not imported by `import jax`)

import reformer_core as rc  # noqa: E402
from reformer_core import Adam, value_and_grad  # noqa: E402
from reformer_core._model.lm import embed  # noqa: E402
from reformer_core.backends.jax import model as jax_model  # noqa: E402

LENGTH, BATCH = 16, 2


def _config(**changes) -> rc.ReformerConfig:
    base = dict(vocab_size=16, d_model=8, num_heads=2, head_dim=4, d_ff=16, attention_layers=("lsh", "local"),
                num_hashes=2, num_buckets=4, lsh_chunk_length=4, local_chunk_length=4, axial_pos_shape=(4, 4))
    return rc.ReformerConfig(**{**base, **changes})


def _max_diff(a, b) -> float:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(leaves_a, leaves_b))


@pytest.fixture(scope="module")
def backend():
    from reformer_core._registry import resolve_backend

    return resolve_backend("jax")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(6)
    return {"tokens": rng.integers(0, 16, (BATCH, LENGTH)), "targets": rng.integers(0, 16, (BATCH, LENGTH)),
            "weights": (rng.random((BATCH, LENGTH)) < 0.7).astype(np.float64)}


# ---------------------------------------------------------------- adapter


def test_adapter_basics(backend, rng):
    assert backend.name == "jax" and backend.autodiff
    assert {"autodiff", "bfloat16", "jit"} <= backend.capabilities
    assert ("float64" in backend.capabilities) == bool(jax.config.jax_enable_x64)
    assert backend.parse_device("cpu") == jax.devices("cpu")[0]
    assert backend.parse_device("cpu:0") == backend.parse_device(jax.devices("cpu")[0])
    host = rng.standard_normal((3, 4)).astype(np.float32)
    array = backend.from_numpy(host)
    assert isinstance(array, jax.Array) and backend.owns(array)
    assert list(array.devices()) == [backend.device]
    np.testing.assert_array_equal(backend.to_numpy(array), host)
    assert backend.from_numpy(host, dtype="bfloat16").dtype == jnp.bfloat16
    assert rc.backend_for(array) is backend or rc.backend_for(array) == backend
    backend.synchronize(array)
    backend.synchronize()


@pytest.mark.parametrize("bad, error, match", [
    ("cpu:7", ValueError, "no device 'cpu:7'"),
    ("cpu:x", ValueError, "platform:index"),
    ("nosuchplatform", ValueError, "no device"),
    (3, TypeError, "jax.Device or a string"),
])
def test_bad_devices(backend, bad, error, match):
    with pytest.raises(error, match=match):
        backend.parse_device(bad)


def test_float64_needs_x64_and_is_never_silently_narrowed(backend):
    if jax.config.jax_enable_x64:
        pytest.skip("x64 is on in this process")
    assert "float64" not in backend.capabilities
    with pytest.raises(TypeError, match="JAX_ENABLE_X64=1"):
        backend.from_numpy(np.zeros(3))
    with pytest.raises(TypeError, match="JAX_ENABLE_X64=1"):
        backend.from_numpy(np.zeros(3, np.float32), dtype="float64")
    assert backend.from_numpy(np.arange(3)).dtype == jnp.int32  # explicit host cast, no warning
    with jax.enable_x64(True):
        assert "float64" in backend.capabilities
        assert backend.from_numpy(np.zeros(3)).dtype == jnp.float64


def test_vjp_of_pytrees(backend):
    def fn(params, xs):
        return jnp.sum(params["w"] * xs[0]) + jnp.sum(params["b"]) * xs[1]

    params = {"w": jnp.arange(3.0), "b": jnp.ones(2)}
    xs = [jnp.ones(3), jnp.float32(2.0)]
    out, pullback = backend.vjp(fn, params, xs)
    grads = pullback(jnp.float32(1.0))
    assert isinstance(grads, tuple) and len(grads) == 2
    np.testing.assert_allclose(grads[0]["w"], np.ones(3))
    np.testing.assert_allclose(grads[0]["b"], np.full(2, 2.0))
    np.testing.assert_allclose(grads[1][0], np.arange(3.0))
    assert float(grads[1][1]) == 2.0 and float(out) == 7.0
    with pytest.raises(TypeError, match="callable"):
        backend.vjp("not a function", params)


# ---------------------------------------------------------------- the core traced


def test_lsh_attention_under_jit_and_vmap(backend, rng):
    qk, v = (rng.standard_normal((2, 2, 16, 4)) for _ in range(2))
    rotations = rc.random_rotations(0, 2, 4, 2, 4, backend="numpy", dtype="float64")
    kwargs = dict(num_buckets=4, chunk_length=4, causal=True)
    expected = np.asarray(rc.lsh_attention(qk, v, rotations, **kwargs))
    put = lambda a: backend.from_numpy(a, dtype="float32")  # noqa: E731
    jitted = jax.jit(lambda q, w, r: rc.lsh_attention(q, w, r, **kwargs))
    np.testing.assert_allclose(jitted(put(qk), put(v), put(rotations)), expected, atol=2e-5)
    per_example = jax.vmap(lambda q, w: rc.lsh_attention(q[None], w[None], put(rotations), **kwargs)[0])
    np.testing.assert_allclose(jax.jit(per_example)(put(qk), put(v)), expected, atol=2e-5)


# ---------------------------------------------------------------- custom_vjp reversible stack


def test_reversible_custom_vjp_check_grads_float64():
    config = _config(hidden_dropout=0.1, attention_dropout=0.1)
    with jax.enable_x64(True):
        params = rc.init_params(config, 1, backend="jax", dtype="float64")
        x = jnp.asarray(np.random.default_rng(1).standard_normal((BATCH, LENGTH, 8)))
        randomness = jax_model.step_randomness(config, 5, batch=BATCH, length=LENGTH, like=params)
        layer_masks = randomness["dropout_masks"]["layers"]

        def stack(layer_params, x1, x2):
            y1, y2 = jax_model.reversible_stack(layer_params, x1, x2, config, rotations=randomness["rotations"],
                                                layer_dropout=layer_masks)
            return y1 * y2  # mixes both outputs

        jax.test_util.check_grads(jax.jit(stack), (params["layers"], x, 0.5 * x), order=1, modes=["rev"], atol=1e-6,
                                  rtol=1e-6, eps=1e-5)


def test_loss_and_grad_equals_value_and_grad(backend, data):
    config = _config(hidden_dropout=0.1, attention_dropout=0.1)
    params = rc.init_params(config, 0, backend="jax")
    tokens, targets = backend.from_numpy(data["tokens"]), backend.from_numpy(data["targets"])
    weights = backend.from_numpy(data["weights"], dtype="float32")
    step = jax.jit(jax_model.loss_and_grad, static_argnames="config")
    losses = []
    # The reference: the core's value_and_grad with the hand-written rules (NumPy, float32,
    # the same numbers); eager value_and_grad on jax is covered by the conformance suite.
    host = rc.init_params(config, 0, backend="numpy", dtype="float32")
    for number in (3, 4):
        randomness = jax_model.step_randomness(config, number, batch=BATCH, length=LENGTH, like=params)
        loss, grads = step(params, tokens, targets, config, weights=weights, **randomness)
        expected_loss, expected = value_and_grad(host, data["tokens"], data["targets"], config,
                                                 weights=data["weights"].astype(np.float32),
                                                 rotations_seed=number, dropout_seed=number)
        assert abs(float(loss) - float(expected_loss)) < 1e-6
        assert _max_diff(grads, expected) < 1e-5
        assert jax.tree.structure(grads) == jax.tree.structure(params)
        losses.append(float(loss))
        traced = step._cache_size() if number == 3 else traced  # jit caches are shared with other tests' jits
    # Another step number means other rotations and masks, with no retrace.
    assert losses[0] != losses[1]
    assert step._cache_size() == traced
    logits = jax.jit(jax_model.apply, static_argnames="config")(
        params, tokens, config, **jax_model.step_randomness(config, 3, batch=BATCH, length=LENGTH, like=params,
                                                            training=False))
    np.testing.assert_allclose(logits, rc.apply(host, data["tokens"], config, rotations_seed=3), atol=1e-5)


def test_jitted_step_resamples_rotations_per_step(backend, data):
    config = _config()
    params = rc.init_params(config, 0, backend="jax")
    tokens = backend.from_numpy(data["tokens"])
    seen = []

    @jax.jit
    def buckets_of_first_layer(params, tokens, rotations):
        x = embed(jnp, params["embedding"], tokens, config)
        return rc.hash_vectors(x[:, None, :, :4], rotations[0][:1], 4)

    for number in (0, 1, 0):
        randomness = jax_model.step_randomness(config, number, batch=BATCH, length=LENGTH, like=params)
        seen.append(np.asarray(buckets_of_first_layer(params, tokens, randomness["rotations"])))
    assert not np.array_equal(seen[0], seen[1])
    np.testing.assert_array_equal(seen[0], seen[2])
    key_rotations = jax_model.rotations_from_key(jax.random.key(0), config, LENGTH)
    assert key_rotations[1] is None and key_rotations[0].shape == (2, 4, 2, 2)


def test_bad_input(backend, data):
    config = _config()
    params = rc.init_params(config, 0, backend="jax")
    tokens = backend.from_numpy(data["tokens"])
    with pytest.raises(ValueError, match="rotations are an explicit input"):
        jax_model.apply(params, tokens, config, rotations=None)
    with pytest.raises(ValueError, match="one entry per layer"):
        jax_model.apply(params, tokens, config, rotations=[None])
    with pytest.raises(ValueError, match="needs rotations"):
        jax_model.apply(params, tokens, config, rotations=[None, None])
    with pytest.raises(TypeError, match="ReformerConfig"):
        jax_model.apply(params, tokens, "config", rotations=[None, None])
    with pytest.raises(ValueError, match="step must be"):
        jax_model.step_randomness(config, -1, batch=BATCH, length=LENGTH, like=params)
    with pytest.raises(TypeError, match="like must be"):
        jax_model.step_randomness(config, 0, batch=BATCH, length=LENGTH, like=np.zeros(3))


# ---------------------------------------------------------------- the scanned stack


@pytest.mark.parametrize("kinds, period", [
    (("lsh",), 1), (("lsh", "lsh", "lsh"), 1), (("lsh", "local") * 2, 2), (("lsh", "local", "lsh"), 3),
    (("local", "full", "local", "full", "local", "full"), 2),
])
def test_layer_period(kinds, period):
    assert jax_model.layer_period(_config(attention_layers=kinds)) == period


@pytest.mark.parametrize("kinds", [("lsh", "local", "lsh", "local"), ("lsh", "lsh", "local"), ("lsh",) * 3])
def test_scanned_layout_gives_the_same_loss_and_grads(backend, data, kinds):
    config = _config(attention_layers=kinds, hidden_dropout=0.1, attention_dropout=0.1)
    params = rc.init_params(config, 0, backend="jax")
    scanned = jax_model.stack_layers(params, config)
    period = jax_model.layer_period(config)
    groups = scanned["layers"]["scanned"]
    assert len(groups) == period
    assert groups[0]["attention"]["qk"].shape == (len(kinds) // period, 8, 8)
    assert _max_diff(jax_model.unstack_layers(scanned, config), params) == 0
    tokens, targets = backend.from_numpy(data["tokens"]), backend.from_numpy(data["targets"])
    randomness = jax_model.step_randomness(config, 2, batch=BATCH, length=LENGTH, like=params)
    step = jax.jit(jax_model.loss_and_grad, static_argnames="config")
    loss, grads = step(params, tokens, targets, config, **randomness)
    scanned_loss, scanned_grads = step(scanned, tokens, targets, config, **randomness)
    assert jax.tree.structure(scanned_grads) == jax.tree.structure(scanned)  # optax-ready
    assert abs(float(loss) - float(scanned_loss)) < 1e-6
    assert _max_diff(jax_model.unstack_layers(scanned_grads, config), grads) < 1e-6
    expected_loss, expected = value_and_grad(rc.init_params(config, 0, backend="numpy", dtype="float32"),
                                             data["tokens"], data["targets"], config, rotations_seed=2,
                                             dropout_seed=2)
    assert abs(float(loss) - float(expected_loss)) < 1e-6 and _max_diff(grads, expected) < 1e-5


def test_optax_trains_the_scanned_layout_like_the_core_adam(backend, data):
    optax = pytest.importorskip("optax", reason="optax is not installed (pip install optax)")
    config = _config(attention_layers=("lsh", "local") * 2)
    params = rc.init_params(config, 0, backend="jax")
    tokens, targets = backend.from_numpy(data["tokens"]), backend.from_numpy(data["targets"])
    optimizer = optax.adam(1e-2, b1=0.9, b2=0.98, eps=1e-9)

    @jax.jit
    def train_step(params, opt_state, rotations):
        loss, grads = jax_model.loss_and_grad(params, tokens, targets, config, rotations=rotations)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    scanned = jax_model.stack_layers(params, config)
    opt_state = optimizer.init(scanned)
    core_adam = Adam(learning_rate=1e-2, beta1=0.9, beta2=0.98, eps=1e-9)
    core_state = core_adam.init(params)
    step = jax.jit(jax_model.loss_and_grad, static_argnames="config")
    losses = []
    for number in range(3):
        rotations = jax_model.step_randomness(config, number, batch=BATCH, length=LENGTH, like=params)["rotations"]
        scanned, opt_state, loss = train_step(scanned, opt_state, rotations)
        _, grads = step(params, tokens, targets, config, rotations=rotations)
        params, core_state = core_adam.update(params, grads, core_state)
        losses.append(float(loss))
    assert losses[2] < losses[0]
    # optax puts eps outside the bias correction, the core inside: equal to float32 rounding here.
    assert _max_diff(jax_model.unstack_layers(scanned, config), params) < 1e-5


def test_scanned_layout_bad_input(backend, data):
    config = _config(attention_layers=("lsh", "lsh"))
    params = rc.init_params(config, 0, backend="jax")
    scanned = jax_model.stack_layers(params, config)
    tokens = backend.from_numpy(data["tokens"])
    randomness = jax_model.step_randomness(config, 0, batch=BATCH, length=LENGTH, like=params, training=False)
    wrong = jax.tree.map(lambda leaf: leaf[:1], scanned["layers"])
    with pytest.raises(ValueError, match=r"scanned/0/attention/norm/bias has shape \(1, 8\), but the config needs \(2, 8\)"):
        jax_model.apply({**scanned, "layers": wrong}, tokens, config, **randomness)
    with pytest.raises(ValueError, match="structure"):
        jax_model.reversible_stack({"scanned": []}, jnp.zeros((BATCH, LENGTH, 8)), jnp.zeros((BATCH, LENGTH, 8)),
                                   config, rotations=randomness["rotations"])
    with pytest.raises(ValueError, match="a list of 2 layers"):
        jax_model.reversible_stack(params["layers"][:1], jnp.zeros((BATCH, LENGTH, 8)),
                                   jnp.zeros((BATCH, LENGTH, 8)), config, rotations=randomness["rotations"])
    with pytest.raises(ValueError, match="shape"):
        jax_model.unstack_layers({**scanned, "layers": wrong}, config)


def test_compiled_step_memory_is_flat_in_depth(backend):
    """The scan keeps one layer's temporaries whatever the depth (XLA's own memory analysis).

    An unrolled stack grew ~60% from 2 to 12 layers here; `reformer-core bench --memory
    --backends jax` measures the issue's size (L=4K)."""
    length = 512
    temps = {}
    for depth in (2, 8):
        config = _config(attention_layers=("lsh",) * depth, d_model=32, head_dim=16, d_ff=64, vocab_size=32,
                         num_buckets=None, lsh_chunk_length=32, axial_pos_shape=(16, 32))
        params = jax_model.stack_layers(rc.init_params(config, 0, backend="jax"), config)
        tokens = jnp.zeros((1, length), jnp.int32)
        randomness = jax_model.step_randomness(config, 0, batch=1, length=length, like=params)
        compiled = jax.jit(jax_model.loss_and_grad, static_argnames="config").lower(
            params, tokens, tokens, config, **randomness).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("this jax build reports no memory analysis")
        temps[depth] = analysis.temp_size_in_bytes
    assert temps[8] <= 1.05 * temps[2], temps


# ---------------------------------------------------------------- two devices


SHARDED = """
    import json
    import numpy as np
    import jax
    from jax.sharding import Mesh
    import reformer_core as rc
    from reformer_core.backends.jax import model as jax_model

    assert len(jax.devices()) == 2, jax.devices()
    config = rc.ReformerConfig(vocab_size=16, d_model=8, num_heads=2, head_dim=4, d_ff=16,
                               attention_layers=("lsh", "local"), num_hashes=2, num_buckets=4, lsh_chunk_length=4,
                               local_chunk_length=4, axial_pos_shape=(4, 4), hidden_dropout=0.1)
    rng = np.random.default_rng(0)
    batch, length = 4, 16
    host = {"tokens": rng.integers(0, 16, (batch, length)).astype(np.int32),
            "targets": rng.integers(0, 16, (batch, length)).astype(np.int32),
            "weights": (rng.random((batch, length)) < 0.7).astype(np.float32)}
    step_fn = jax.jit(jax_model.loss_and_grad, static_argnames="config")
    update = jax.jit(lambda params, grads: jax.tree.map(lambda p, g: p - 0.5 * g, params, grads))

    def train(params, put_batch, batch_sharding=None):
        data = {k: put_batch(v) for k, v in host.items()}
        for step in range(3):
            randomness = jax_model.step_randomness(config, step, batch=batch, length=length, like=params,
                                                   batch_sharding=batch_sharding)
            loss, grads = step_fn(params, data["tokens"], data["targets"], config, weights=data["weights"],
                                  **randomness)
            params = update(params, grads)
        return params, grads, data

    params0 = rc.init_params(config, 0, backend="jax")
    single, single_grads, _ = train(params0, jax.numpy.asarray)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated, split = jax_model.data_parallel_shardings(mesh)
    sharded, sharded_grads, data = train(jax.device_put(params0, replicated), lambda a: jax.device_put(a, split),
                                         batch_sharding=split)
    diff = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    leaf = sharded["layers"][0]["attention"]["qk"]
    print(json.dumps({
        "params": diff(single, sharded), "grads": diff(single_grads, sharded_grads),
        "moved": diff(single, params0),
        "params_replicated": bool(leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 2),
        "tokens_split": [s.data.shape[0] for s in data["tokens"].addressable_shards],
    }))
"""


def test_data_parallel_over_two_devices_equals_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    env.pop("REFORMER_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(SHARDED)], env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["tokens_split"] == [2, 2]
    assert report["params_replicated"]
    assert report["moved"] > 1e-3  # training changed the parameters
    assert report["grads"] < 1e-6 and report["params"] < 1e-6, report


def test_native_full_attention_is_causal_softmax_attention(backend):
    from gradcheck import naive_causal_attention

    host = [np.random.default_rng(i).standard_normal((1, 2, 48, 8)).astype(np.float32) for i in range(3)]
    out = backend.native_full_attention(*(backend.from_numpy(x) for x in host), causal=True)
    assert "native-attention" in backend.capabilities and tuple(out.shape) == (1, 2, 48, 8)
    np.testing.assert_allclose(backend.to_numpy(out), naive_causal_attention(*host), rtol=1e-4, atol=1e-5)
