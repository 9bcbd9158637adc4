"""Compare reformer_core against the loop-based reference in tests/reference.py.

All comparisons are float64 with rtol = atol = 1e-10; bucket ids must match
exactly.  Inputs are random Gaussians, so argmax ties have probability ~0.
"""

import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

import reformer_core as rc

from reference import (
    ref_full_attention,
    ref_hash,
    ref_local_attention,
    ref_lsh_attention,
)

RTOL = 1e-10
ATOL = 1e-10

BUCKET_CHOICES = [2, 4, 6, 8, (2, 2), (2, 4), (4, 2), (2, 2, 2)]

HYP = settings(
    deadline=None,
    # modest by default; set REFORMER_REF_EXAMPLES=2000 for a stress run
    max_examples=int(os.environ.get("REFORMER_REF_EXAMPLES", "40")),
    suppress_health_check=[HealthCheck.too_slow],
)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def _rng(seed):
    return np.random.default_rng(seed)


def _gauss(rng, *shape):
    return rng.standard_normal(shape).astype(np.float64)


def _make_mask(rng, batch, length, kind):
    """kind: None (no mask), "ones" (all True), "random" (some False)."""
    if kind is None:
        return None
    if kind == "ones":
        return np.ones((batch, length), dtype=bool)
    mask = rng.random((batch, length)) < 0.7
    # keep at least one real token per row; force at least one padding
    # position somewhere so the mask matters
    mask[:, 0] = True
    if length > 1:
        mask[0, -1] = False
    return mask


def _rotations(seed, heads, dim, num_hashes, num_buckets):
    rot = rc.random_rotations(seed, heads, dim, num_hashes, num_buckets,
                              dtype="float64")
    rot = np.asarray(rot, dtype=np.float64)
    size = num_buckets if isinstance(num_buckets, int) else sum(num_buckets)
    assert rot.shape == (heads, dim, num_hashes, size // 2)
    return rot


def _close(actual, expected):
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def _run_lsh(seed, batch, heads, length, dim, num_hashes, num_buckets,
             chunk_length, before, after, causal, mask_kind, dup):
    rng = _rng(seed)
    qk = _gauss(rng, batch, heads, length, dim)
    v = _gauss(rng, batch, heads, length, dim)
    rot = _rotations(seed, heads, dim, num_hashes, num_buckets)
    keep = _make_mask(rng, batch, length, mask_kind)
    got = rc.lsh_attention(
        qk, v, rot, num_buckets=num_buckets, chunk_length=chunk_length,
        num_chunks_before=before, num_chunks_after=after, causal=causal,
        attention_mask=keep, duplicate_correction=dup)
    want = ref_lsh_attention(
        qk, v, rot, num_buckets, chunk_length, num_chunks_before=before,
        num_chunks_after=after, causal=causal, keep=keep,
        duplicate_correction=dup)
    _close(got, want)


# ---------------------------------------------------------------------------
# hashing
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("num_buckets", BUCKET_CHOICES)
@pytest.mark.parametrize("mask_kind", [None, "ones", "random"])
def test_hash_matches_reference(num_buckets, mask_kind):
    rng = _rng(11)
    batch, heads, length, dim, num_hashes = 2, 2, 12, 6, 3
    x = _gauss(rng, batch, heads, length, dim)
    rot = _rotations(5, heads, dim, num_hashes, num_buckets)
    keep = _make_mask(rng, batch, length, mask_kind)
    got = np.asarray(rc.hash_vectors(x, rot, num_buckets, attention_mask=keep))
    want = ref_hash(x, rot, num_buckets, keep=keep)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@HYP
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 2),
    heads=st.integers(1, 2),
    length=st.integers(1, 10),
    dim=st.sampled_from([2, 3, 4, 6]),
    num_hashes=st.integers(1, 4),
    num_buckets=st.sampled_from(BUCKET_CHOICES),
    mask_kind=st.sampled_from([None, "ones", "random"]),
)
def test_hash_property(seed, batch, heads, length, dim, num_hashes,
                       num_buckets, mask_kind):
    rng = _rng(seed)
    x = _gauss(rng, batch, heads, length, dim)
    rot = _rotations(seed, heads, dim, num_hashes, num_buckets)
    keep = _make_mask(rng, batch, length, mask_kind)
    got = np.asarray(rc.hash_vectors(x, rot, num_buckets, attention_mask=keep))
    want = ref_hash(x, rot, num_buckets, keep=keep)
    np.testing.assert_array_equal(got, want)


def test_ref_hash_hand_example():
    """Sanity check of the reference itself on a hand-computed case."""
    # D = 2, one head, one round, num_buckets = 4 -> rotation size 2
    rot = np.zeros((1, 2, 2, 2))
    rot[0, :, 0, :] = np.eye(2)
    rot[0, :, 1, :] = np.eye(2)
    x = np.array([[[[3.0, 1.0], [0.5, -2.0], [-4.0, 1.0]]]])  # (1,1,3,2)
    # y = x; [y, -y] argmax: [3,1,-3,-1]->0; [.5,-2,-.5,2]->3; [-4,1,4,-1]->2
    got = ref_hash(x, rot, 4)
    np.testing.assert_array_equal(got[0, 0], [[0, 3, 2], [4, 7, 6]])
    keep = np.array([[True, False, True]])
    got = ref_hash(x, rot, 4, keep=keep)
    np.testing.assert_array_equal(got[0, 0], [[0, 4, 2], [5, 9, 7]])
    # factorised (2, 2): factor 1 uses y[0], factor 2 uses y[1]
    # t0: a1=argmax[3,-3]=0, a2=argmax[1,-1]=0 -> 0
    # t1: a1=argmax[.5,-.5]=0, a2=argmax[-2,2]=1 -> 2
    # t2: a1=argmax[-4,4]=1, a2=argmax[1,-1]=0 -> 1
    got = ref_hash(x, rot, (2, 2))
    np.testing.assert_array_equal(got[0, 0], [[0, 2, 1], [4, 6, 5]])


# ---------------------------------------------------------------------------
# full attention
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "random"])
@pytest.mark.parametrize("length", [1, 2, 7])
def test_full_attention(causal, mask_kind, length):
    rng = _rng(3 + length)
    qk = _gauss(rng, 2, 2, length, 4)
    v = _gauss(rng, 2, 2, length, 4)
    keep = _make_mask(rng, 2, length, mask_kind)
    got = rc.full_attention(qk, v, causal=causal, attention_mask=keep)
    _close(got, ref_full_attention(qk, v, causal=causal, keep=keep))


# ---------------------------------------------------------------------------
# LSH attention
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("num_hashes", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dup", [False, True])
def test_lsh_rounds_causal_dup(num_hashes, causal, dup):
    _run_lsh(seed=100 + num_hashes, batch=2, heads=2, length=12, dim=4,
             num_hashes=num_hashes, num_buckets=4, chunk_length=4,
             before=1, after=0, causal=causal, mask_kind=None, dup=dup)


@pytest.mark.parametrize("mask_kind", ["ones", "random"])
@pytest.mark.parametrize("num_hashes", [1, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_lsh_padding(mask_kind, num_hashes, causal):
    _run_lsh(seed=7, batch=2, heads=1, length=12, dim=4,
             num_hashes=num_hashes, num_buckets=4, chunk_length=3,
             before=1, after=0, causal=causal, mask_kind=mask_kind,
             dup=True)


@pytest.mark.parametrize("num_buckets", [(2, 2), (2, 4), (4, 2), (2, 2, 2)])
@pytest.mark.parametrize("dup", [False, True])
def test_lsh_factorised_buckets(num_buckets, dup):
    _run_lsh(seed=21, batch=1, heads=2, length=16, dim=6, num_hashes=2,
             num_buckets=num_buckets, chunk_length=4, before=1, after=0,
             causal=False, mask_kind="random", dup=dup)


@pytest.mark.parametrize("before", [0, 1, 2])
@pytest.mark.parametrize("after", [0, 1, 2])
def test_lsh_window_shapes(before, after):
    _run_lsh(seed=31 + 3 * before + after, batch=1, heads=2, length=12,
             dim=4, num_hashes=2, num_buckets=6, chunk_length=3,
             before=before, after=after, causal=False, mask_kind=None,
             dup=True)


@pytest.mark.parametrize("dup", [False, True])
def test_lsh_small_chunk_count_repeats_chunks(dup):
    # n*L/chunk = 2 chunks with before = after = 1: chunk c-1 == c+1
    _run_lsh(seed=41, batch=1, heads=1, length=4, dim=4, num_hashes=1,
             num_buckets=4, chunk_length=2, before=1, after=1, causal=False,
             mask_kind=None, dup=dup)
    _run_lsh(seed=42, batch=1, heads=1, length=4, dim=4, num_hashes=2,
             num_buckets=4, chunk_length=4, before=1, after=1, causal=True,
             mask_kind="random", dup=dup)


@pytest.mark.parametrize("length", [1, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "random"])
def test_lsh_short_sequence_is_full_attention(length, causal, mask_kind):
    _run_lsh(seed=51 + length, batch=2, heads=1, length=length, dim=4,
             num_hashes=3, num_buckets=4, chunk_length=4, before=1, after=0,
             causal=causal, mask_kind=mask_kind, dup=True)


@HYP
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 2),
    heads=st.integers(1, 2),
    dim=st.sampled_from([2, 4, 6]),
    chunk_length=st.integers(1, 4),
    num_chunks_seq=st.integers(1, 4),
    short=st.booleans(),
    num_hashes=st.integers(1, 4),
    num_buckets=st.sampled_from(BUCKET_CHOICES),
    before=st.integers(0, 2),
    after=st.integers(0, 2),
    causal=st.booleans(),
    mask_kind=st.sampled_from([None, "ones", "random"]),
    dup=st.booleans(),
)
def test_lsh_property(seed, batch, heads, dim, chunk_length, num_chunks_seq,
                      short, num_hashes, num_buckets, before, after, causal,
                      mask_kind, dup):
    if short:
        # L <= chunk_length: plain full attention
        length = 1 + seed % chunk_length
    else:
        length = chunk_length * num_chunks_seq
    _run_lsh(seed=seed, batch=batch, heads=heads, length=length, dim=dim,
             num_hashes=num_hashes, num_buckets=num_buckets,
             chunk_length=chunk_length, before=before, after=after,
             causal=causal, mask_kind=mask_kind, dup=dup)


# ---------------------------------------------------------------------------
# local attention
# ---------------------------------------------------------------------------

def _run_local(seed, batch, heads, length, dim, chunk_length, before, after,
               causal, mask_kind):
    rng = _rng(seed)
    q = _gauss(rng, batch, heads, length, dim)
    k = _gauss(rng, batch, heads, length, dim)
    v = _gauss(rng, batch, heads, length, dim)
    keep = _make_mask(rng, batch, length, mask_kind)
    got = rc.local_attention(
        q, k, v, chunk_length=chunk_length, num_chunks_before=before,
        num_chunks_after=after, causal=causal, attention_mask=keep)
    want = ref_local_attention(
        q, k, v, chunk_length, num_chunks_before=before,
        num_chunks_after=after, causal=causal, keep=keep)
    _close(got, want)


@pytest.mark.parametrize("before", [0, 1, 2])
@pytest.mark.parametrize("after", [0, 1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_local_window_shapes(before, after, causal):
    _run_local(seed=61 + before * 3 + after, batch=2, heads=2, length=12,
               dim=4, chunk_length=3, before=before, after=after,
               causal=causal, mask_kind="random")


@pytest.mark.parametrize("length", [1, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_local_short_sequence(length, causal):
    _run_local(seed=71, batch=1, heads=2, length=length, dim=4,
               chunk_length=4, before=1, after=1, causal=causal,
               mask_kind="random")


def test_local_repeated_chunk_counts_twice():
    # 2 chunks, before = after = 1: the other chunk is listed twice
    _run_local(seed=81, batch=1, heads=1, length=4, dim=4, chunk_length=2,
               before=1, after=1, causal=False, mask_kind=None)


@HYP
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 2),
    heads=st.integers(1, 2),
    dim=st.sampled_from([1, 2, 4, 5]),
    chunk_length=st.integers(1, 4),
    num_chunks_seq=st.integers(1, 5),
    short=st.booleans(),
    before=st.integers(0, 2),
    after=st.integers(0, 2),
    causal=st.booleans(),
    mask_kind=st.sampled_from([None, "ones", "random"]),
)
def test_local_property(seed, batch, heads, dim, chunk_length, num_chunks_seq,
                        short, before, after, causal, mask_kind):
    if short:
        length = 1 + seed % chunk_length
    else:
        length = chunk_length * num_chunks_seq
    _run_local(seed=seed, batch=batch, heads=heads, length=length, dim=dim,
               chunk_length=chunk_length, before=before, after=after,
               causal=causal, mask_kind=mask_kind)


# ---------------------------------------------------------------------------
# sanity checks of the reference itself (independent of the library)
# ---------------------------------------------------------------------------

def test_ref_lsh_single_chunk_window_equals_full_attention():
    """If every slot's window covers every item exactly once per round, one
    round of LSH attention equals full attention (sort order irrelevant)."""
    rng = _rng(91)
    qk = _gauss(rng, 1, 1, 8, 4)
    v = _gauss(rng, 1, 1, 8, 4)
    rot = _gauss(rng, 1, 4, 1, 2)
    # L = 8, chunk 4 -> 2 chunks; before=1, after=0 covers both chunks once
    got = ref_lsh_attention(qk, v, rot, 4, 4, num_chunks_before=1,
                            num_chunks_after=0, causal=True)
    want = ref_full_attention(qk, v, causal=True)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_ref_local_full_window_equals_dense():
    rng = _rng(92)
    q, k, v = (_gauss(rng, 1, 1, 6, 3) for _ in range(3))
    got = ref_local_attention(q, k, v, 2, num_chunks_before=2,
                              num_chunks_after=0, causal=True)
    logits = np.einsum("bhid,bhjd->bhij", q, k) / np.sqrt(3)
    logits = np.where(np.triu(np.ones((6, 6), bool), 1), -1e9, logits)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, w @ v, rtol=1e-12, atol=1e-12)
