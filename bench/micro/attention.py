"""pytest-benchmark micro-benchmarks of LSH and full attention at a small size.

Run with ``python -m pytest bench/micro/attention.py`` (needs ``pip install -e '.[bench]'``);
compare runs with ``--benchmark-autosave`` and ``pytest-benchmark compare``. Not part of the
test suite (``testpaths`` is ``tests/``). Every installed backend but array_api_strict is
benchmarked (fixtures in ``bench/micro/conftest.py``); the length sweep with memory is
``reformer-core bench``.
"""

from __future__ import annotations

import numpy as np
import pytest

import reformer_core as rc

pytest.importorskip("pytest_benchmark")

BATCH, HEADS, LENGTH, HEAD_DIM, CHUNK_LENGTH = 1, 2, 1024, 64, 64


@pytest.fixture(scope="module")
def inputs(backend):
    rng = np.random.default_rng(0)
    shape = (BATCH, HEADS, LENGTH, HEAD_DIM)
    qk = backend.from_numpy(rng.standard_normal(shape), dtype="float32")
    v = backend.from_numpy(rng.standard_normal(shape), dtype="float32")
    return qk, v


@pytest.mark.parametrize("num_hashes", [1, 2, 4, 8])
def test_lsh_attention(measure, inputs, num_hashes):
    qk, v = inputs
    num_buckets = rc.default_num_buckets(LENGTH, CHUNK_LENGTH)
    rotations = rc.random_rotations(0, HEADS, HEAD_DIM, num_hashes, num_buckets, like=qk)
    out = measure(lambda: rc.lsh_attention(qk, v, rotations, num_buckets=num_buckets, chunk_length=CHUNK_LENGTH,
                                           causal=True), f"attention L={LENGTH}")
    assert tuple(out.shape) == (BATCH, HEADS, LENGTH, HEAD_DIM)


def test_full_attention(measure, inputs):
    qk, v = inputs
    out = measure(lambda: rc.full_attention(qk, v, causal=True), f"attention L={LENGTH}")
    assert tuple(out.shape) == (BATCH, HEADS, LENGTH, HEAD_DIM)
