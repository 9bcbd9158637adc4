"""Benchmark one LSH attention call on two backends, side by side (alternating A B A B).

Each backend gets the same inputs (made with NumPy, then placed with ``backend.from_numpy``),
one warm-up call, then ``--repeats`` rounds that call every backend once, so a burst of load
from another process hits both alike; the table gives min / median / max per backend and the
median ratio within rounds. ``reformer-core bench`` is the full tool (all attention kinds,
lengths, memory, JSON, plots); this is the idea in a page.

    python examples/compare_backends.py                          # numpy vs strict (array_api_strict)
    python examples/compare_backends.py --backends numpy,torch --length 4096
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

import reformer_core as rc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="numpy,strict", help="two (or more) backends, comma-separated")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--hashes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    heads, head_dim, chunk = 2, 64, 64
    rng = np.random.default_rng(0)
    host_qk = rng.standard_normal((1, heads, args.length, head_dim)).astype(np.float32)
    host_v = rng.standard_normal((1, heads, args.length, head_dim)).astype(np.float32)
    num_buckets = rc.default_num_buckets(args.length, chunk_length=chunk)

    calls = {}
    for name in args.backends.split(","):
        with rc.use_backend(name) as backend:
            qk, v = backend.from_numpy(host_qk), backend.from_numpy(host_v)
            rotations = rc.random_rotations(0, heads, head_dim, num_hashes=args.hashes, num_buckets=num_buckets,
                                            like=qk)

        def call(backend=backend, qk=qk, v=v, rotations=rotations):
            out = rc.lsh_attention(qk, v, rotations, num_buckets=num_buckets, chunk_length=chunk, causal=True)
            backend.synchronize(out)  # asynchronous frameworks: time the work, not the dispatch
            return out

        call()  # warm-up (first-call costs, compilation)
        calls[name] = call

    times = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():  # A B A B: each round calls every backend once
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)

    reference = next(iter(calls))
    print(f"lsh_attention, L={args.length}, {heads} heads x {head_dim}, {args.hashes} hashes, chunk {chunk}, "
          f"float32, {args.repeats} rounds")
    print(f"{'backend':<10} {'min ms':>9} {'median ms':>10} {'max ms':>9}  vs {reference}")
    for name, seconds in times.items():
        ratio = statistics.median(r / s for r, s in zip(times[reference], seconds))
        print(f"{name:<10} {min(seconds) * 1e3:9.1f} {statistics.median(seconds) * 1e3:10.1f} "
              f"{max(seconds) * 1e3:9.1f}  {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
