"""Properties of the attention kinds, checked by hypothesis over shapes and configurations."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reformer_core as rc

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def lsh_cases(draw):
    """A random LSH attention problem: inputs, rotations and keyword arguments (float64)."""
    batch = draw(st.integers(1, 2))
    heads = draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    chunk = draw(st.sampled_from([2, 4, 8]))
    length = chunk * draw(st.integers(2, 4))
    num_hashes = draw(st.integers(1, 3))
    num_buckets = draw(st.sampled_from([2, 4, 8, (2, 2), (2, 4)]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    qk = rng.standard_normal((batch, heads, length, head_dim))
    v = rng.standard_normal((batch, heads, length, head_dim))
    mask = None
    if draw(st.booleans()):
        mask = np.ones((batch, length), dtype=bool)
        for b in range(batch):
            mask[b, length - draw(st.integers(0, length - 1)):] = False
    rotations = rc.random_rotations(seed, heads, head_dim, num_hashes, num_buckets, dtype="float64")
    kwargs = dict(
        num_buckets=num_buckets,
        chunk_length=chunk,
        num_chunks_before=draw(st.integers(0, 2)),
        num_chunks_after=draw(st.integers(0, 1)),
        causal=draw(st.booleans()),
        attention_mask=mask,
        duplicate_correction=draw(st.booleans()),
    )
    return qk, v, rotations, kwargs


def full_of(qk, v, kwargs):
    return rc.full_attention(qk, v, causal=kwargs["causal"], attention_mask=kwargs["attention_mask"])


@SETTINGS
@given(lsh_cases())
def test_single_chunk_equals_full_attention(case):
    """When the chunk holds the whole sequence, LSH attention is full shared-QK attention."""
    qk, v, rotations, kwargs = case
    kwargs["chunk_length"] = qk.shape[2] * 2
    np.testing.assert_allclose(rc.lsh_attention(qk, v, rotations, **kwargs), full_of(qk, v, kwargs),
                               rtol=1e-12, atol=1e-12)


@SETTINGS
@given(lsh_cases())
def test_windows_covering_every_chunk_equal_full_attention(case):
    """Chunked path: if every window holds every chunk, each key has the same multiplicity in
    every window (the number of rounds), so softmax and the round weights reduce to full attention,
    with or without the duplicate correction."""
    qk, v, rotations, kwargs = case
    num_chunks = rotations.shape[2] * qk.shape[2] // kwargs["chunk_length"]
    kwargs["num_chunks_before"], kwargs["num_chunks_after"] = num_chunks - 1, 0
    np.testing.assert_allclose(rc.lsh_attention(qk, v, rotations, **kwargs), full_of(qk, v, kwargs),
                               rtol=1e-9, atol=1e-9)


@SETTINGS
@given(lsh_cases(), st.data())
def test_causal_output_ignores_later_positions(case, data):
    """Causal: position i's output does not change when later values change arbitrarily and later
    shared-QK vectors are scaled by positive factors (which keeps their buckets, so the sort and
    the chunk boundaries stay put; see docs/numerics.md for why bucket changes can move them)."""
    qk, v, rotations, kwargs = case
    kwargs["causal"] = True
    length = qk.shape[2]
    i = data.draw(st.integers(0, length - 2))
    rng = np.random.default_rng(i)
    qk2, v2 = qk.copy(), v.copy()
    qk2[:, :, i + 1 :] *= rng.uniform(0.1, 10.0, size=(1, 1, length - i - 1, 1))
    v2[:, :, i + 1 :] = rng.standard_normal(v2[:, :, i + 1 :].shape) * 100
    before = rc.lsh_attention(qk, v, rotations, **kwargs)
    after = rc.lsh_attention(qk2, v2, rotations, **kwargs)
    np.testing.assert_allclose(after[:, :, : i + 1], before[:, :, : i + 1], rtol=1e-12, atol=1e-12)


@SETTINGS
@given(lsh_cases(), st.floats(1e-3, 1e3))
def test_buckets_invariant_to_positive_scaling(case, scale):
    qk, _, rotations, kwargs = case
    mask = kwargs["attention_mask"]
    np.testing.assert_array_equal(
        rc.hash_vectors(qk * scale, rotations, kwargs["num_buckets"], attention_mask=mask),
        rc.hash_vectors(qk, rotations, kwargs["num_buckets"], attention_mask=mask),
    )


@SETTINGS
@given(lsh_cases())
def test_padding_gets_its_own_last_bucket(case):
    qk, _, rotations, kwargs = case
    mask = kwargs["attention_mask"]
    if mask is None:
        mask = np.ones((qk.shape[0], qk.shape[2]), dtype=bool)
        mask[:, -1] = False
    buckets = rc.hash_vectors(qk, rotations, kwargs["num_buckets"], attention_mask=mask)
    per_round = int(np.prod(kwargs["num_buckets"])) + 1
    rounds = np.arange(rotations.shape[2])[None, None, :, None]
    local = buckets - rounds * per_round
    assert ((local >= 0) & (local < per_round)).all()
    padded = np.broadcast_to(~mask[:, None, None, :], buckets.shape)
    assert (local[padded] == per_round - 1).all()
    assert (local[~padded] < per_round - 1).all()


def _perturb_padding(rng, mask, *arrays):
    out = []
    for a in arrays:
        a = a.copy()
        pad = ~mask
        a[np.broadcast_to(pad[:, None, :, None], a.shape)] = rng.standard_normal(int(pad.sum()) * a.shape[1] * a.shape[3]) * 1e3
        out.append(a)
    return out


@SETTINGS
@given(lsh_cases())
def test_padded_keys_never_receive_attention(case):
    """Changing anything at padded positions leaves every real position's output unchanged."""
    qk, v, rotations, kwargs = case
    mask = kwargs["attention_mask"]
    if mask is None or mask.all():
        mask = np.ones((qk.shape[0], qk.shape[2]), dtype=bool)
        mask[:, -2:] = False
        kwargs["attention_mask"] = mask
    qk2, v2 = _perturb_padding(np.random.default_rng(1), mask, qk, v)
    real = np.broadcast_to(mask[:, None, :, None], qk.shape)
    for fn in (lambda a, b: rc.lsh_attention(a, b, rotations, **kwargs), lambda a, b: full_of(a, b, kwargs)):
        np.testing.assert_allclose(fn(qk2, v2)[real], fn(qk, v)[real], rtol=1e-12, atol=1e-12)
    local = dict(chunk_length=kwargs["chunk_length"], num_chunks_before=kwargs["num_chunks_before"],
                 num_chunks_after=kwargs["num_chunks_after"], causal=kwargs["causal"], attention_mask=mask)
    np.testing.assert_allclose(rc.local_attention(qk2, qk2, v2, **local)[real],
                               rc.local_attention(qk, qk, v, **local)[real], rtol=1e-12, atol=1e-12)


@SETTINGS
@given(lsh_cases())
def test_output_is_a_convex_combination_of_allowed_values(case):
    """With one-hot values, the output rows are attention distributions: non-negative, summing
    to one, and (causal) zero on later positions."""
    qk, _, rotations, kwargs = case
    batch, heads, length, _ = qk.shape
    qk = qk[..., :2].copy() if qk.shape[-1] >= 2 else qk
    rotations = rotations[:, : qk.shape[-1]]
    eye = np.broadcast_to(np.eye(length), (batch, heads, length, length)).copy()
    qk_wide = np.zeros((batch, heads, length, length))
    qk_wide[..., : qk.shape[-1]] = qk
    rot = np.zeros((heads, length, *rotations.shape[2:]))
    rot[:, : qk.shape[-1]] = rotations
    probs = rc.lsh_attention(qk_wide, eye, rot, **kwargs)
    assert (probs >= -1e-12).all()
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-10)
    if kwargs["causal"]:
        assert np.abs(np.triu(probs, k=1)).max() < 1e-12


def test_results_are_deterministic_for_a_fixed_seed():
    a = rc.random_rotations(5, 2, 8, 3, (2, 4), dtype="float64")
    b = rc.random_rotations(5, 2, 8, 3, (2, 4), dtype="float64")
    c = rc.random_rotations(6, 2, 8, 3, (2, 4), dtype="float64")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    rng = np.random.default_rng(0)
    qk, v = rng.standard_normal((2, 2, 32, 8)), rng.standard_normal((2, 2, 32, 8))
    kwargs = dict(num_buckets=(2, 4), chunk_length=8, causal=True)
    np.testing.assert_array_equal(rc.lsh_attention(qk, v, a, **kwargs), rc.lsh_attention(qk, v, b, **kwargs))
    assert not np.allclose(rc.lsh_attention(qk, v, a, **kwargs), rc.lsh_attention(qk, v, c, **kwargs))


def test_rotations_have_the_documented_shape_and_dtype():
    assert rc.random_rotations(0, 3, 5, 2, 8).shape == (3, 5, 2, 4)
    assert rc.random_rotations(0, 3, 5, 2, (2, 4, 6)).shape == (3, 5, 2, 6)
    assert rc.random_rotations(0, 1, 1, 1, 2).dtype == np.float32
    float32 = rc.random_rotations(0, 2, 4, 2, 4)
    float64 = rc.random_rotations(0, 2, 4, 2, 4, dtype="float64")
    np.testing.assert_array_equal(float32, float64.astype(np.float32))


def test_factorised_buckets_combine_factors():
    """bucket = a1 + b1 * a2 where a_k hashes the k-th block of rotated columns."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, 16, 4))
    rotations = rc.random_rotations(1, 1, 4, 1, (2, 4), dtype="float64")
    buckets = rc.hash_vectors(x, rotations, (2, 4))[0, 0, 0]
    rotated = x[0, 0] @ rotations[0, :, 0]
    a1 = np.argmax(np.concatenate([rotated[:, :1], -rotated[:, :1]], 1), 1)
    a2 = np.argmax(np.concatenate([rotated[:, 1:3], -rotated[:, 1:3]], 1), 1)
    np.testing.assert_array_equal(buckets, a1 + 2 * a2)
    assert set(np.unique(rc.hash_vectors(rng.standard_normal((1, 1, 400, 4)), rotations, (2, 4)))) <= set(range(8))


def test_round_offsets():
    rng = np.random.default_rng(0)
    rotations = rc.random_rotations(1, 1, 4, 3, 4, dtype="float64")
    buckets = rc.hash_vectors(rng.standard_normal((1, 1, 50, 4)), rotations, 4)
    for r in range(3):
        assert ((buckets[:, :, r] >= 4 * r) & (buckets[:, :, r] < 4 * (r + 1))).all()


@pytest.mark.parametrize("length,chunk,before,after", [(16, 4, 1, 0), (16, 4, 2, 1), (8, 4, 1, 1), (8, 8, 1, 0)])
def test_local_attention_window(length, chunk, before, after):
    """Non-causal local attention equals full softmax attention restricted to the window, where
    the window repeats keys if it wraps onto the same chunk twice."""
    rng = np.random.default_rng(length + chunk)
    q, k, v = (rng.standard_normal((1, 1, length, 4)) for _ in range(3))
    got = rc.local_attention(q, k, v, chunk_length=chunk, num_chunks_before=before, num_chunks_after=after)
    expected = np.zeros_like(q)
    num_chunks = max(length // chunk, 1)
    for i in range(length):
        if length <= chunk:
            keys = list(range(length))
        else:
            c = i // chunk
            keys = [j for o in range(-before, after + 1) for j in range(((c + o) % num_chunks) * chunk,
                                                                      ((c + o) % num_chunks + 1) * chunk)]
        logits = np.array([q[0, 0, i] @ k[0, 0, j] / 2.0 for j in keys])
        p = np.exp(logits - logits.max())
        expected[0, 0, i] = (p / p.sum()) @ v[0, 0, keys]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
