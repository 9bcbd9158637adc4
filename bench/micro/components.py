"""pytest-benchmark micro-benchmarks of the hot components, for every installed backend:
hashing, sorting, chunked attention of the sorted sequence, and one reversible layer's
forward and backward.

Run with ``python -m pytest bench/micro/components.py`` (``pip install -e '.[bench]'``). Not part
of the test suite; ``reformer-core bench`` is the length sweep.
"""

from __future__ import annotations

import numpy as np
import pytest

import reformer_core as rc
from reformer_core._model.blocks import reversible_layers
from reformer_core._attention.hashing import compute_buckets
from reformer_core._attention.lsh import lsh_with_buckets
from reformer_core._model.reversible import reversible_backward, reversible_forward
from reformer_core._attention.sorting import sort_by_bucket

pytest.importorskip("pytest_benchmark")

BATCH, HEADS, LENGTH, HEAD_DIM, CHUNK, HASHES = 1, 4, 2048, 64, 64, 4


@pytest.fixture(scope="module")
def problem(backend):
    rng = np.random.default_rng(0)
    shape = (BATCH, HEADS, LENGTH, HEAD_DIM)
    qk, v = (backend.from_numpy(rng.standard_normal(shape), dtype="float32") for _ in range(2))
    num_buckets = rc.default_num_buckets(LENGTH, CHUNK)
    rotations = rc.random_rotations(0, HEADS, HEAD_DIM, HASHES, num_buckets, like=qk)
    buckets = compute_buckets(backend.xp, qk, rotations, num_buckets, None)
    return qk, v, rotations, num_buckets, buckets


def testcompute_buckets(measure, backend, problem):
    qk, _, rotations, num_buckets, _ = problem
    measure(lambda: compute_buckets(backend.xp, qk, rotations, num_buckets, None), "hash")


def test_sort(measure, backend, problem):
    buckets = problem[4]
    measure(lambda: sort_by_bucket(backend.xp, buckets), "sort")


def test_chunked_attention(measure, backend, problem):
    qk, v, _, _, buckets = problem
    measure(lambda: lsh_with_buckets(backend.xp, qk, v, buckets, None, chunk_length=CHUNK,
                                                      num_chunks_before=1, num_chunks_after=0, causal=True)[0],
         "chunked attention")


def test_reversible_layer_forward_and_backward(measure, backend):
    config = rc.ReformerConfig(vocab_size=16, d_model=256, num_heads=HEADS, head_dim=HEAD_DIM, d_ff=512,
                               attention_layers=("lsh",), num_hashes=2, lsh_chunk_length=CHUNK,
                               ff_chunk_length=512, axial_pos_shape=(64, 64))
    params = rc.init_params(config, 0, backend=backend)
    x = backend.from_numpy(np.random.default_rng(1).standard_normal((BATCH, LENGTH, 256)), dtype="float32")
    layers = reversible_layers(backend.xp, params, config, rotations=rc.sample_rotations(config, LENGTH, 0, like=x))

    def step():
        y1, y2 = reversible_forward(layers, x, x)
        return reversible_backward(layers, y1, y2, y1, y2, vjp=backend.vjp)

    measure(step, "reversible layer fwd+bwd")
