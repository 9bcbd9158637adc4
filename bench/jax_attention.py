"""JAX LSH attention: the native fast path (backends/jax/lsh_kernel.py) against the jitted
standard Array-API path and torch's default path, forward+backward (not run in CI).

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2" \\
        python bench/jax_attention.py --length 16384 --repeats 5 --threads 2

One LSH attention block: shared-QK and value projections from ``hidden (1, L, d_model)``,
``heads`` heads of ``head_dim``, chunk 64, ``--hashes`` rounds, causal, float32; the time of
``value_and_grad`` of ``sum(out * cotangent)`` in the hidden states and both projections.
Variants run alternately (A B C A B C ...) after one warm-up each (which compiles the JAX
ones); the table gives the median, min and max of ``--repeats`` rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import warnings

import numpy as np


def _jax_variant(host, rotations_host, options, standard, kernel=None):
    import jax
    import jax.numpy as jnp

    import reformer_core as rc
    from reformer_core.backends.jax import lsh_kernel

    hidden, w_qk, w_v, cotangent = (jnp.asarray(x) for x in host)
    rotations = jnp.asarray(rotations_host)
    heads, head_dim = options["heads"], options["head_dim"]
    kwargs = options["kwargs"]

    def loss(hidden, w_qk, w_v):
        def split(x):  # (1, L, heads * head_dim) -> (1, heads, L, head_dim)
            return jnp.transpose(x.reshape(1, -1, heads, head_dim), (0, 2, 1, 3))

        out = rc.lsh_attention(split(hidden @ w_qk), split(hidden @ w_v), rotations, **kwargs)
        return jnp.sum(out * cotangent)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    previous = lsh_kernel.KERNEL
    lsh_kernel.KERNEL = kernel
    try:
        with rc.standard_path(standard):  # read when the step is traced: at the warm-up below
            jax.block_until_ready(step(hidden, w_qk, w_v))
    finally:
        lsh_kernel.KERNEL = previous
    return lambda: jax.block_until_ready(step(hidden, w_qk, w_v))


def _torch_variant(host, rotations_host, options):
    import torch

    import reformer_core as rc

    hidden, w_qk, w_v, cotangent = (torch.from_numpy(x) for x in host)
    rotations = torch.from_numpy(rotations_host)
    leaves = [x.clone().requires_grad_(True) for x in (hidden, w_qk, w_v)]
    heads, head_dim = options["heads"], options["head_dim"]

    def step():
        def split(x):
            return x.reshape(1, -1, heads, head_dim).transpose(1, 2)

        h, a, b = leaves
        out = rc.lsh_attention(split(h @ a), split(h @ b), rotations, **options["kwargs"])
        loss = (out * cotangent).sum()
        return torch.autograd.grad(loss, leaves)

    step()
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--hashes", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--pallas-interpret", action="store_true", help="also the Pallas forward in interpret mode")
    args = parser.parse_args(argv)

    import reformer_core as rc

    warnings.filterwarnings("ignore", message=r"Explicitly requested dtype int64")  # JAX without x64: int32
    rng = np.random.default_rng(0)
    d_model = args.heads * args.head_dim
    host = (rng.standard_normal((1, args.length, d_model)).astype(np.float32),
            (rng.standard_normal((d_model, d_model)) / np.sqrt(d_model)).astype(np.float32),
            (rng.standard_normal((d_model, d_model)) / np.sqrt(d_model)).astype(np.float32),
            rng.standard_normal((1, args.heads, args.length, args.head_dim)).astype(np.float32))
    num_buckets = rc.default_num_buckets(args.length, args.chunk)
    rotations = rc.random_rotations(0, args.heads, args.head_dim, args.hashes, num_buckets,
                                    like=np.zeros((1,), np.float32))
    options = dict(heads=args.heads, head_dim=args.head_dim,
                   kwargs=dict(num_buckets=num_buckets, chunk_length=args.chunk, causal=True))

    variants = {}
    start = time.perf_counter()
    variants["jax fast (jnp custom_vjp)"] = _jax_variant(host, rotations, options, standard=False, kernel="jnp")
    print(f"compiled jax fast in {time.perf_counter() - start:.1f} s", flush=True)
    start = time.perf_counter()
    variants["jax standard path"] = _jax_variant(host, rotations, options, standard=True)
    print(f"compiled jax standard in {time.perf_counter() - start:.1f} s", flush=True)
    if args.pallas_interpret:
        variants["jax pallas (interpret)"] = _jax_variant(host, rotations, options, standard=False,
                                                          kernel="pallas-interpret")
    if not args.no_torch:
        import torch

        torch.set_num_threads(args.threads)
        variants["torch default (fused kernel)"] = _torch_variant(host, rotations, options)

    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    print(f"L={args.length} heads={args.heads}x{args.head_dim} chunk={args.chunk} hashes={args.hashes} causal "
          f"float32, forward+backward with projections, {args.repeats} alternating rounds")
    for name, values in times.items():
        print(f"  {name:32s} median {statistics.median(values):.3f} s  (min {min(values):.3f}, "
              f"max {max(values):.3f})  all {[round(v, 3) for v in values]}")


if __name__ == "__main__":
    main()
