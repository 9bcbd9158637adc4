"""pytest-benchmark micro-benchmarks of LSH and full attention at a small size.

Run with ``python -m pytest bench/attention.py`` (needs ``pip install -e '.[bench]'``);
compare runs with ``--benchmark-autosave`` and ``pytest-benchmark compare``. Not part of the
test suite (``testpaths`` is ``tests/``). Every installed backend is benchmarked; the
length sweep with memory is ``reformer-core bench``.
"""

from __future__ import annotations

import numpy as np
import pytest

import reformer_core as rc

pytest.importorskip("pytest_benchmark")

BATCH, HEADS, LENGTH, HEAD_DIM, CHUNK_LENGTH = 1, 2, 1024, 64, 64


@pytest.fixture(params=rc.available_backends(), scope="module")
def backend(request):
    with rc.use_backend(request.param) as backend:
        yield backend


@pytest.fixture(scope="module")
def inputs(backend):
    rng = np.random.default_rng(0)
    shape = (BATCH, HEADS, LENGTH, HEAD_DIM)
    qk = backend.from_numpy(rng.standard_normal(shape), dtype="float32")
    v = backend.from_numpy(rng.standard_normal(shape), dtype="float32")
    return qk, v


def _run(benchmark, backend, fn):
    def call():
        out = fn()
        backend.synchronize()
        return out

    benchmark.extra_info["backend"] = backend.name
    return benchmark(call)


@pytest.mark.parametrize("num_hashes", [1, 2, 4, 8])
def test_lsh_attention(benchmark, backend, inputs, num_hashes):
    qk, v = inputs
    num_buckets = rc.default_num_buckets(LENGTH, CHUNK_LENGTH)
    rotations = rc.random_rotations(0, HEADS, HEAD_DIM, num_hashes, num_buckets, like=qk)
    benchmark.group = f"attention L={LENGTH} {backend.name}"
    out = _run(
        benchmark, backend,
        lambda: rc.lsh_attention(qk, v, rotations, num_buckets=num_buckets, chunk_length=CHUNK_LENGTH, causal=True),
    )
    assert tuple(out.shape) == (BATCH, HEADS, LENGTH, HEAD_DIM)


def test_full_attention(benchmark, backend, inputs):
    qk, v = inputs
    benchmark.group = f"attention L={LENGTH} {backend.name}"
    out = _run(benchmark, backend, lambda: rc.full_attention(qk, v, causal=True))
    assert tuple(out.shape) == (BATCH, HEADS, LENGTH, HEAD_DIM)
