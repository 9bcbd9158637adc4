"""The jitted JAX decode loop (``reformer_core.backends.jax.generate``).

It must return what the eager ``reformer_core.generate`` returns: greedy tokens equal the
eager loop's and the argmax of ``rc.apply`` on the padded prefix (checked in float64, inside
``jax.enable_x64(True)`` blocks; the global switch is left alone), sampled tokens equal the
NumPy backend's for the same seed and weights; the whole loop is one compilation, and bad
input raises generate's errors.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="the jitted decode loop needs jax (pip install 'reformer-core[jax]')")
import jax.numpy as jnp  # noqa: E402

import reformer_core as rc  # noqa: E402
import reformer_core._model.decode as core  # noqa: E402
from reformer_core._model.generate import generation_config, padded_length  # noqa: E402
from reformer_core.backends.jax import generate as jax_generate  # noqa: E402

from generate_cases import STACKS, VOCAB, make_config  # noqa: E402


# One token (a padded prefill; the steps then cross every chunk boundary, the LSH layers' one-chunk case
# included); the edge stacks also start on a boundary (4), just past it (5) and at two chunks (8).
PROMPTS = {name: (1,) for name in STACKS}
PROMPTS.update({name: (1, 4, 5, 8) for name in ("local-wraps", "lsh-3-rounds-2-back", "local-then-lsh")})


def recomputed_greedy(params, config, prompt, new):
    """Greedy tokens from ``rc.apply`` (NumPy) on the whole prefix, padded and masked, every step."""
    reference = generation_config(config)
    tokens = np.array(prompt)
    for _ in range(new):
        batch, n = tokens.shape
        total = padded_length(reference, n)
        padded = np.concatenate([tokens, np.zeros((batch, total - n), np.int64)], axis=1)
        mask = np.ascontiguousarray(np.broadcast_to(np.arange(total) < n, padded.shape))
        logits = np.asarray(rc.apply(params, padded, reference, attention_mask=mask))
        tokens = np.concatenate([tokens, np.argmax(logits[:, n - 1], axis=-1)[:, None]], axis=1)
    return tokens


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_jitted_greedy_equals_the_eager_loop_and_the_recompute_float64(stack):
    config = make_config(**STACKS[stack])
    numpy_params = rc.init_params(config, seed=2, backend="numpy", dtype="float64")
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        params = rc.init_params(config, seed=2, backend="jax", dtype="float64")
        for prompt_length in PROMPTS[stack]:
            prompt = rng.integers(0, VOCAB, (2, prompt_length))
            new = config.max_length - prompt_length  # up to the last position the axial table has
            got = np.asarray(jax_generate.generate(params, config, jnp.asarray(prompt), new, temperature=0))
            eager = rc.generate(numpy_params, config, prompt, new, temperature=0)
            assert np.array_equal(got, eager), (stack, prompt_length)
            assert np.array_equal(got, recomputed_greedy(numpy_params, config, prompt, new)), (stack, prompt_length)
            assert len(np.unique(got[:, prompt_length:])) > 3  # the model does not just repeat one token


def test_one_compilation_for_the_whole_loop_and_the_core_dispatches_to_it(monkeypatch):
    """The step is traced once, whatever the number of tokens; later calls with other seeds,
    temperatures or weights reuse the compilation; rc.generate on JAX arrays runs the same
    compiled loop, and with on_token the eager loop (one step call per token): the same tokens
    (float32 here)."""
    config = make_config(attention_layers=("local", "lsh"), d_model=16, head_dim=8)  # shapes no other test uses
    calls = {"prefill": 0, "step": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(core, "prefill", counting("prefill", core.prefill))
    monkeypatch.setattr(core, "decode_step", counting("step", core.decode_step))
    params = rc.init_params(config, seed=1, backend="jax")
    prompt = jnp.asarray([[1, 2, 3], [4, 5, 6]])
    greedy = jax_generate.generate(params, config, prompt, 4, temperature=0)
    assert calls == {"prefill": 1, "step": 1} and greedy.shape == (2, 7)
    options = dict(temperature=0.9, top_k=10, top_p=0.9, eos_token_id=3)
    jax_generate.generate(params, config, prompt, 4, seed=1, **options)
    assert calls == {"prefill": 2, "step": 2}  # sampling with filters and eos: a second compilation
    other = rc.init_params(config, seed=2, backend="jax")
    for seed, temperature in ((2, 0.5), (3, 1.3)):
        jax_generate.generate(other, config, prompt, 4, seed=seed, **dict(options, temperature=temperature))
    assert np.array_equal(rc.generate(params, config, prompt, 4, temperature=0), greedy)
    assert calls == {"prefill": 2, "step": 2}  # no new trace
    streamed = []
    eager = rc.generate(params, config, prompt, 4, temperature=0, on_token=streamed.append)
    assert calls == {"prefill": 3, "step": 5}  # the eager loop: one prefill, a step per token after the first
    assert np.array_equal(eager, greedy) and np.array_equal(np.stack(streamed, axis=1), np.asarray(greedy)[:, 3:])
    assert greedy.dtype == prompt.dtype  # float32 weights: the NumPy backend's float32 eager loop agrees too
    numpy_params = rc.init_params(config, seed=1, backend="numpy")
    assert np.array_equal(greedy, rc.generate(numpy_params, config, np.asarray(prompt), 4, temperature=0))


@pytest.mark.parametrize("options", [
    dict(temperature=0.9, top_k=12, top_p=0.95),
    dict(temperature=1.0),
    dict(temperature=1.7, top_k=5),
    dict(temperature=0.6, top_p=0.5),
    dict(temperature=1.0, top_k=VOCAB + 5, top_p=1.0),  # filters that keep everything
])
def test_sampling_equals_the_numpy_backend_float64(options):
    config = make_config(attention_layers=("local", "lsh"))
    prompt = np.random.default_rng(5).integers(0, VOCAB, (3, 4))
    numpy_params = rc.init_params(config, seed=3, backend="numpy", dtype="float64")
    expected = rc.generate(numpy_params, config, prompt, 20, seed=11, **options)
    with jax.enable_x64(True):
        params = rc.init_params(config, seed=3, backend="jax", dtype="float64")
        got = np.asarray(jax_generate.generate(params, config, jnp.asarray(prompt), 20, seed=11, **options))
        other_seed = np.asarray(jax_generate.generate(params, config, jnp.asarray(prompt), 20, seed=12, **options))
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, other_seed)


def test_sampling_float32_equals_the_numpy_backend():
    """float32 logits and sampling arithmetic: equal unless a draw lands on a rounding tie
    (none does for these seeds; a mismatch here would have to be shown to be one)."""
    config = make_config(attention_layers=("local", "lsh"))
    prompt = np.random.default_rng(5).integers(0, VOCAB, (3, 4))
    options = dict(temperature=0.9, top_k=12, top_p=0.95, seed=11)
    expected = rc.generate(rc.init_params(config, seed=3, backend="numpy"), config, prompt, 20, **options)
    got = rc.generate(rc.init_params(config, seed=3, backend="jax"), config, jnp.asarray(prompt), 20, **options)
    assert np.array_equal(np.asarray(got), expected)


def test_uniforms_drawn_at_once_are_the_per_step_draws():
    whole = np.random.default_rng(9).random((7, 3))
    rng = np.random.default_rng(9)
    assert np.array_equal(whole, np.stack([rng.random(3) for _ in range(7)]))


def test_top_k_one_and_a_tiny_nucleus_are_greedy():
    config = make_config(attention_layers=("local", "lsh"))
    params = rc.init_params(config, seed=4, backend="jax")
    prompt = jnp.asarray(np.random.default_rng(6).integers(0, VOCAB, (2, 3)))
    greedy = jax_generate.generate(params, config, prompt, 20, temperature=0)
    assert np.array_equal(greedy, jax_generate.generate(params, config, prompt, 20, temperature=1.5, top_k=1, seed=9))
    assert np.array_equal(greedy, jax_generate.generate(params, config, prompt, 20, temperature=0.7, top_p=1e-9,
                                                        seed=9))


def test_eos_stops_early_like_the_eager_loop_and_shapes_and_dtypes_follow_the_prompt():
    config = make_config(attention_layers=("local",))
    params = rc.init_params(config, seed=5, backend="jax")
    numpy_params = rc.init_params(config, seed=5, backend="numpy")
    prompt = np.array([[1, 2], [3, 4]])
    greedy = np.asarray(jax_generate.generate(params, config, jnp.asarray(prompt), 12, temperature=0))
    common = sorted(set(greedy[0, 2:].tolist()) & set(greedy[1, 2:].tolist()))
    assert common  # an id both rows produce: with it as eos the generation ends early
    for eos in common[:3]:
        got = np.asarray(jax_generate.generate(params, config, jnp.asarray(prompt), 12, temperature=0,
                                               eos_token_id=eos))
        assert np.array_equal(got, rc.generate(numpy_params, config, prompt, 12, temperature=0, eos_token_id=eos))
        last = max(int(np.flatnonzero(row[2:] == eos)[0]) for row in greedy)  # the step where both have ended
        assert got.shape == (2, 2 + last + 1)
        for row, full in zip(got, greedy):
            stop = 2 + int(np.flatnonzero(full[2:] == eos)[0])
            assert np.array_equal(row[:stop + 1], full[:stop + 1]) and np.all(row[stop:] == eos)
    first = jax_generate.generate(params, config, jnp.asarray(prompt, dtype=jnp.uint8), 1, temperature=0)
    assert first.dtype == jnp.uint8 and np.array_equal(first, greedy[:, :3])  # one token: the loop never runs
    single = jax_generate.generate(params, config, jnp.asarray([1, 2]), 5, temperature=0)
    assert single.shape == (7,) and np.array_equal(single, greedy[0, :7])
    same = jnp.asarray(prompt)
    assert jax_generate.generate(params, config, same, 0) is same


def _bad_calls():
    bad = [
        (lambda p, c: (jnp.zeros((2, 0), jnp.int32), 3, {}), ValueError, "empty"),
        (lambda p, c: (jnp.zeros((1, 30), jnp.int32), 3, {}), ValueError, "maximum length"),
        (lambda p, c: (jnp.zeros((1, 3)), 3, {}), TypeError, "integer"),
        (lambda p, c: (jnp.asarray([[1, VOCAB]]), 3, {}), ValueError, "vocab_size"),
        (lambda p, c: (jnp.zeros((1, 1, 1), jnp.int32), 3, {}), ValueError, "shape"),
        (lambda p, c: (jnp.asarray([[1]]), -1, {}), ValueError, "max_new_tokens"),
        (lambda p, c: (jnp.asarray([[1]]), 3, dict(temperature=-1.0)), ValueError, "temperature"),
        (lambda p, c: (jnp.asarray([[1]]), 3, dict(top_k=0)), ValueError, "top_k"),
        (lambda p, c: (jnp.asarray([[1]]), 3, dict(top_p=1.5)), ValueError, "top_p"),
        (lambda p, c: (jnp.asarray([[1]]), 3, dict(eos_token_id=VOCAB)), ValueError, "eos_token_id"),
        (lambda p, c: (jnp.asarray([[1]]), 3, dict(seed=-1)), ValueError, "seed"),
        (lambda p, c: (np.asarray([[1]]), 3, {}), TypeError, "different frameworks"),
    ]
    return bad


@pytest.mark.parametrize("entry", range(len(_bad_calls())))
def test_bad_input_raises_the_errors_of_generate(entry):
    make, error, phrase = _bad_calls()[entry]
    config = make_config(attention_layers=("local", "lsh"))
    params = rc.init_params(config, seed=0, backend="jax")
    prompt, new, options = make(params, config)
    for fn in (rc.generate, jax_generate.generate):
        with pytest.raises(error, match=phrase):
            fn(params, config, prompt, new, **options)
    with pytest.raises(ValueError, match="causal"):
        jax_generate.generate(params, config.replace(causal=False), jnp.asarray([[1]]), 3)


def test_other_backends_are_refused_with_a_pointer_to_the_core():
    config = make_config(attention_layers=("local",))
    params = rc.init_params(config, seed=0, backend="numpy")
    with pytest.raises(TypeError, match="reformer_core.generate"):
        jax_generate.generate(params, config, np.asarray([[1, 2]]), 3)
