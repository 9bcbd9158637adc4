"""What the pytest-benchmark micro-benchmarks share: one backend per installed framework, and a
timer that waits for each result (JAX dispatches asynchronously; timing the call alone would
time the dispatch)."""

from __future__ import annotations

import pytest

import reformer_core as rc


# array_api_strict is a conformance checker, not something to benchmark.
@pytest.fixture(params=[name for name in rc.available_backends() if name != "strict"], scope="module")
def backend(request):
    with rc.use_backend(request.param) as backend:
        yield backend


@pytest.fixture
def measure(benchmark, backend):
    """``measure(fn, group)``: benchmark ``fn()`` on ``backend``, waiting for its result; returns it."""

    def run(fn, group):
        benchmark.group = f"{group} {backend.name}"
        benchmark.extra_info["backend"] = backend.name

        def call():
            out = fn()
            backend.synchronize(out)
            return out

        return benchmark(call)

    return run
