"""Cached autoregressive generation (``reformer_core.generate``).

The contract: each greedy token equals the argmax of ``rc.apply`` on the prefix padded to a
multiple of the chunk lengths (with the padding mask), for local and full layers and for an
LSH layer whose inputs are exact; the cached logits equal the recomputed ones to rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

import reformer_core as rc
from reformer_core._model.generate import cached_logits, choose_tokens, generation_config, padded_length
from reformer_core._model.layers import layer_norm
from reformer_core._model.lm import embed

torch = pytest.importorskip("torch")

from generate_cases import STACKS, VOCAB, make_config  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models: torch's thread pool only adds overhead (and contends on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Prompt lengths: one token, a chunk boundary (4), just past it (5), two chunks (8).
PROMPTS = (1, 4, 5, 8)


def _pad(tokens_np: np.ndarray, config) -> tuple[np.ndarray, np.ndarray]:
    batch, n = tokens_np.shape
    total = padded_length(config, n)
    padded = np.concatenate([tokens_np, np.zeros((batch, total - n), np.int64)], axis=1)
    return padded, np.broadcast_to(np.arange(total) < n, padded.shape)


def recomputed_logits(params, config, tokens_np, prompt_length, convert):
    """Per step, the logits of ``rc.apply`` at the last real position of the padded prefix."""
    reference = generation_config(config)
    rows = []
    for n in range(prompt_length, tokens_np.shape[1] + 1):
        padded, mask = _pad(tokens_np[:, :n], reference)
        logits = rc.apply(params, convert(padded), reference, attention_mask=convert(np.ascontiguousarray(mask)))
        rows.append(_host(logits)[:, n - 1])
    return np.stack(rows, axis=1)


def recomputed_greedy(params, config, prompt_np, new, convert):
    reference = generation_config(config)
    tokens = np.array(prompt_np)
    for _ in range(new):
        n = tokens.shape[1]
        padded, mask = _pad(tokens, reference)
        logits = _host(rc.apply(params, convert(padded), reference, attention_mask=convert(np.ascontiguousarray(mask))))
        tokens = np.concatenate([tokens, np.argmax(logits[:, n - 1], axis=-1)[:, None]], axis=1)
    return tokens


def _host(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().double().numpy()
    return np.asarray(array, dtype=np.float64) if np.asarray(array).dtype.kind == "f" else np.asarray(array)


BACKENDS = {
    "numpy": ("numpy", lambda a: a),
    "torch": ("torch", lambda a: torch.from_numpy(np.array(a))),
}


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_cached_logits_equal_the_recompute_numpy(stack):
    config = make_config(**STACKS[stack])
    params = rc.init_params(config, seed=1, backend="numpy", dtype="float64")
    tokens = np.random.default_rng(7).integers(0, VOCAB, (2, config.max_length))
    for prompt_length in (1, 5):
        cached = cached_logits(params, config, tokens, prompt_length)
        recomputed = recomputed_logits(params, config, tokens, prompt_length, lambda a: a)
        np.testing.assert_allclose(cached, recomputed, rtol=0, atol=1e-10, err_msg=f"{stack} prompt {prompt_length}")


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("stack", sorted(STACKS))
def test_greedy_tokens_equal_the_recompute(stack, backend):
    name, convert = BACKENDS[backend]
    config = make_config(**STACKS[stack])
    params = rc.init_params(config, seed=2, backend=name, dtype="float64")
    rng = np.random.default_rng(3)
    for prompt_length in PROMPTS:
        prompt = rng.integers(0, VOCAB, (2, prompt_length))
        new = config.max_length - prompt_length
        got = _host(rc.generate(params, config, convert(prompt), new, temperature=0))
        expected = recomputed_greedy(params, config, prompt, new, convert)
        assert np.array_equal(got, expected), (stack, backend, prompt_length)
        assert len(np.unique(got[:, prompt_length:])) > 3  # the model does not just repeat one token


def test_the_lsh_cases_reach_into_the_previous_round_and_the_padding():
    """The exactness cases above include queries whose window holds another round's items and
    padding items (checked here on the first LSH layer, whose inputs are the embeddings)."""
    config = make_config(**STACKS["lsh-3-rounds-2-back"])
    params = rc.init_params(config, seed=2, backend="numpy", dtype="float64")
    tokens = np.random.default_rng(3).integers(0, VOCAB, (2, config.max_length))
    x = embed(np, params["embedding"], tokens, config)
    h = layer_norm(np, x, params["layers"][0]["attention"]["norm"], config.layer_norm_eps)
    qk = np.transpose(np.reshape(h @ params["layers"][0]["attention"]["qk"], (2, -1, 2, 6)), (0, 2, 1, 3))
    rotations = rc.sample_rotations(config, config.max_length, 0, like=qk)[0]
    buckets = rc.hash_vectors(qk, rotations, config.num_buckets)  # (b, h, n, L)
    chunk, before, rounds = config.lsh_chunk_length, config.lsh_num_chunks_before, config.num_hashes
    other_round = padding = False
    for n in range(chunk + 1, config.max_length + 1):
        total = padded_length(config, n)
        own = buckets[..., :n]
        rank = np.sum(own[..., :-1] <= own[..., -1:], axis=-1)
        slot = np.arange(rounds) * total + rank
        chunks = (slot // chunk)[..., None] - np.arange(before, -1, -1)
        items = (chunks % (rounds * total // chunk))[..., None] * chunk + np.arange(chunk)
        item_round, item_rank = items // total, items % total
        other_round |= bool(np.any(item_round != np.arange(rounds)[:, None, None]))
        padding |= bool(np.any(item_rank >= n))
    assert other_round and padding


def test_several_lsh_layers_start_exact_and_run():
    """Not exact in general (docs/numerics.md): the first token (from the prompt's forward) is."""
    config = make_config(attention_layers=("lsh", "lsh"))
    params = rc.init_params(config, seed=2, backend="numpy", dtype="float64")
    prompt = np.random.default_rng(4).integers(0, VOCAB, (2, 6))
    out = rc.generate(params, config, prompt, 10, temperature=0)
    assert out.shape == (2, 16)
    assert np.array_equal(out[:, :7], recomputed_greedy(params, config, prompt, 1, lambda a: a))


def test_sampling_is_reproducible_per_seed_and_across_backends():
    config = make_config(attention_layers=("local", "lsh"))
    options = dict(temperature=0.9, top_k=12, top_p=0.95)
    prompt = np.random.default_rng(5).integers(0, VOCAB, (3, 4))
    numpy_params = rc.init_params(config, seed=3, backend="numpy", dtype="float64")
    torch_params = rc.init_params(config, seed=3, backend="torch", dtype="float64")
    first = rc.generate(numpy_params, config, prompt, 20, seed=11, **options)
    assert np.array_equal(first, rc.generate(numpy_params, config, prompt, 20, seed=11, **options))
    assert not np.array_equal(first, rc.generate(numpy_params, config, prompt, 20, seed=12, **options))
    on_torch = rc.generate(torch_params, config, torch.from_numpy(prompt), 20, seed=11, **options)
    assert np.array_equal(first, on_torch.numpy())


def test_top_k_one_and_a_tiny_nucleus_are_greedy():
    config = make_config(attention_layers=("local", "lsh"))
    params = rc.init_params(config, seed=4, backend="numpy", dtype="float64")
    prompt = np.random.default_rng(6).integers(0, VOCAB, (2, 3))
    greedy = rc.generate(params, config, prompt, 20, temperature=0)
    assert np.array_equal(greedy, rc.generate(params, config, prompt, 20, temperature=1.5, top_k=1, seed=9))
    assert np.array_equal(greedy, rc.generate(params, config, prompt, 20, temperature=0.7, top_p=1e-9, seed=9))


def test_choose_tokens_filters():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.1, 0.5, 0.15, 0.25], [0.25, 0.25, 0.25, 0.25]]))
    for _ in range(50):
        picked = choose_tokens(logits, rng, top_k=2)
        assert picked[0] in (1, 3) and picked[1] in (0, 1)  # ties go to the lower ids
        picked = choose_tokens(logits, rng, top_p=0.7)  # 0.5 + 0.25 reaches 0.7
        assert picked[0] in (1, 3)
    assert list(choose_tokens(logits, rng, temperature=0)) == [1, 0]
    counts = np.bincount([choose_tokens(logits[:1], rng)[0] for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.1, 0.5, 0.15, 0.25], atol=0.03)


def test_eos_ends_sequences_and_a_1d_prompt_stays_1d():
    config = make_config(attention_layers=("local",))
    params = rc.init_params(config, seed=5, backend="numpy", dtype="float64")
    prompt = np.array([[1, 2], [3, 4]])
    greedy = rc.generate(params, config, prompt, 12, temperature=0)
    eos = int(greedy[0, 4])
    out = rc.generate(params, config, prompt, 12, temperature=0, eos_token_id=eos)
    for row, full in zip(out, greedy):
        hits = np.flatnonzero(full[2:] == eos)
        if hits.size:  # after its first eos a sequence keeps producing eos
            stop = 2 + hits[0]
            assert np.array_equal(row[:stop + 1], full[:stop + 1]) and np.all(row[stop:] == eos)
    assert out.shape[1] <= greedy.shape[1]
    single = rc.generate(params, config, np.array([1, 2]), 5, temperature=0)
    assert single.shape == (7,) and np.array_equal(single, greedy[0, :7])
    assert np.array_equal(rc.generate(params, config, prompt, 0), prompt)
    assert rc.generate(params, config, prompt.astype(np.int32), 3, temperature=0).dtype == np.int32


def test_torch_module_generate_matches_the_core():
    from reformer_core.backends.torch import ReformerLM

    config = make_config(attention_layers=("local", "lsh"))
    model = ReformerLM(config, seed=6, dtype=torch.float64).eval()
    prompt = torch.tensor([[1, 5, 7]])
    out = model.generate(prompt, 12, temperature=0)
    params = rc.init_params(config, seed=6, backend="numpy", dtype="float64")
    assert np.array_equal(out.numpy(), rc.generate(params, config, prompt.numpy(), 12, temperature=0,
                                                   rotations_seed=6))
    assert not any(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("call, error, phrase", [
    (lambda p, c: rc.generate(p, c, np.zeros((2, 0), np.int64), 3), ValueError, "empty"),
    (lambda p, c: rc.generate(p, c, np.zeros((0, 3), np.int64), 3), ValueError, "empty"),
    (lambda p, c: rc.generate(p, c, np.zeros((1, 30), np.int64), 3), ValueError, "maximum length"),
    (lambda p, c: rc.generate(p, c, np.zeros((1, 3)), 3), TypeError, "integer"),
    (lambda p, c: rc.generate(p, c, np.array([[1, VOCAB]]), 3), ValueError, "vocab_size"),
    (lambda p, c: rc.generate(p, c, np.array([[1, -1]]), 3), ValueError, "vocab_size"),
    (lambda p, c: rc.generate(p, c, np.zeros((1, 1, 1), np.int64), 3), ValueError, "shape"),
    (lambda p, c: rc.generate(p, c, np.array([[1]]), -1), ValueError, "max_new_tokens"),
    (lambda p, c: rc.generate(p, c, np.array([[1]]), 2.5), TypeError, "max_new_tokens"),
    (lambda p, c: rc.generate(p, c, np.array([[1]]), 3, temperature=-1.0), ValueError, "temperature"),
    (lambda p, c: rc.generate(p, c, np.array([[1]]), 3, temperature=float("nan")), ValueError, "temperature"),
    (lambda p, c: rc.generate(p, c, np.array([[1]]), 3, top_k=0), ValueError, "top_k"),
    (lambda p, c: rc.generate(p, c, np.array([[1]]), 3, top_k=2.0), TypeError, "top_k"),
    (lambda p, c: rc.generate(p, c, np.array([[1]]), 3, top_p=0.0), ValueError, "top_p"),
    (lambda p, c: rc.generate(p, c, np.array([[1]]), 3, top_p=1.5), ValueError, "top_p"),
    (lambda p, c: rc.generate(p, c, np.array([[1]]), 3, eos_token_id=VOCAB), ValueError, "eos_token_id"),
    (lambda p, c: rc.generate(p, c, np.array([[1]]), 3, seed=-1), ValueError, "seed"),
    (lambda p, c: rc.generate(p, c, torch.tensor([[1]]), 3), TypeError, "different frameworks"),
    (lambda p, c: rc.generate(p, c.replace(causal=False), np.array([[1]]), 3), ValueError, "causal"),
])
def test_bad_input_raises_clearly(call, error, phrase):
    config = make_config(attention_layers=("local", "lsh"))
    params = rc.init_params(config, seed=0, backend="numpy")
    with pytest.raises(error, match=phrase):
        call(params, config)
