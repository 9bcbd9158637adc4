"""The Triton LSH kernel (backends/torch/triton_lsh.py) against the torch-op kernel and SDPA, on CUDA.

    python bench/triton_vs_sdpa.py --json triton.json            # 4K, 16K, 32K tokens
    python bench/triton_vs_sdpa.py --lengths 4096 --dtypes float32

For each dtype and length (batch 1, 4 heads of 64, chunk 64, LSH-2, causal): the forward and
forward+backward time (median of ``--repeats``) and the forward+backward's peak CUDA memory of

* ``triton``: ``triton_lsh.lsh_chunk_attention`` on buckets sorted once beforehand (the step
  after hashing, the part the kernels replace);
* ``torch_ops``: ``lsh_kernel.lsh_chunk_attention`` (the torch-op kernel) on the same sort;
* ``lsh_default``: ``rc.lsh_attention`` end to end (hashing, sorting and the dispatch's kernel);
* ``sdpa``: ``scaled_dot_product_attention``, full causal attention on the same heads (flash
  attention where the dtype allows it).

Before timing, the Triton results (output and both gradients) are compared with the torch-op
kernel's at the first length; the largest differences go into the report. CUDA only: it exits
with status 2 on a machine without a CUDA device, so CI never runs it on a CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _timed(fn, repeats):
    import torch

    fn()  # warm-up: the first call compiles the Triton kernels for this shape's options
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak(fn):
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _case(length, dtype, args):
    """Inputs, the sorted permutation and the keyword arguments of one shape."""
    import numpy as np
    import torch

    import reformer_core as rc
    from array_api_compat import torch as xp
    from reformer_core._attention.sorting import sort_by_bucket

    rng = np.random.default_rng(length)
    shape = (1, args.heads, length, args.head_dim)
    qk = torch.from_numpy(rng.standard_normal(shape)).to("cuda", dtype)
    v = torch.from_numpy(rng.standard_normal(shape)).to("cuda", dtype)
    num_buckets = rc.default_num_buckets(length, args.chunk)
    rotations = rc.random_rotations(0, args.heads, args.head_dim, args.hashes, num_buckets, like=qk)
    perm, undo = sort_by_bucket(xp, rc.hash_vectors(qk, rotations, num_buckets))
    step = dict(key_keep=None, logit_bias=None, dropout_keep=None, dropout_rate=0.0, chunk_length=args.chunk,
                num_chunks_before=1, num_chunks_after=0, causal=True)
    public = dict(num_buckets=num_buckets, chunk_length=args.chunk, num_chunks_before=1, num_chunks_after=0,
                  causal=True)
    return qk, v, rotations, perm, undo, step, public


def _rows(length, dtype, args):
    import torch
    import torch.nn.functional as F

    import reformer_core as rc
    from reformer_core.backends.torch import lsh_kernel, triton_lsh

    qk, v, rotations, perm, undo, step, public = _case(length, dtype, args)
    q_leaf, v_leaf = qk.clone().requires_grad_(True), v.clone().requires_grad_(True)
    candidates = {
        "triton": lambda: triton_lsh.lsh_chunk_attention(q_leaf, v_leaf, perm, undo, **step),
        "torch_ops": lambda: lsh_kernel.lsh_chunk_attention(q_leaf, v_leaf, perm, undo, **step),
        "lsh_default": lambda: rc.lsh_attention(q_leaf, v_leaf, rotations, **public),
        "sdpa": lambda: F.scaled_dot_product_attention(q_leaf, q_leaf, v_leaf, is_causal=True),
    }
    rows = {}
    for name, fn in candidates.items():
        def forward(fn=fn):
            with torch.no_grad():
                fn()

        def both(fn=fn):
            fn().sum().backward()
            q_leaf.grad = v_leaf.grad = None

        try:
            rows[name] = {"forward_s": _timed(forward, args.repeats), "forward_backward_s": _timed(both, args.repeats),
                          "forward_backward_peak_bytes": _peak(both)}
        except Exception as error:  # one failing row (out of memory, a compile error) must not hide the rest
            rows[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
            torch.cuda.empty_cache()
    return rows


def _agreement(length, dtype, args):
    """Largest |triton - torch_ops| of the output and both gradients, and their scales."""
    import torch

    from reformer_core.backends.torch import lsh_kernel, triton_lsh

    qk, v, _, perm, undo, step, _ = _case(length, dtype, args)
    found = {}
    results = []
    for kernel in (triton_lsh, lsh_kernel):
        a, b = qk.clone().requires_grad_(True), v.clone().requires_grad_(True)
        out = kernel.lsh_chunk_attention(a, b, perm, undo, **step)
        cotangent = torch.ones_like(out)
        results.append((out.detach(), *torch.autograd.grad(out, (a, b), cotangent)))
    for what, x, y in zip(("out", "d_qk", "d_v"), *results):
        found[what] = {"max_abs_diff": float((x.double() - y.double()).abs().max()),
                       "max_abs": float(y.double().abs().max())}
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,16384,32768")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--hashes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("triton_vs_sdpa: no CUDA device; this benchmark runs on a GPU only", file=sys.stderr)
        return 2
    lengths = [int(x) for x in args.lengths.split(",") if x]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "settings": vars(args),
              "agreement": {}, "rows": {}}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        print("triton_vs_sdpa: Triton is not installed", file=sys.stderr)
        return 2
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        report["agreement"][name] = _agreement(lengths[0], dtype, args)
        print(name, "agreement at", lengths[0], json.dumps(report["agreement"][name]), flush=True)
        for length in lengths:
            rows = report["rows"].setdefault(name, {})[str(length)] = _rows(length, dtype, args)
            for row, found in rows.items():
                text = found.get("error") or (f"fwd {found['forward_s'] * 1e3:8.2f} ms  fwd+bwd "
                                              f"{found['forward_backward_s'] * 1e3:8.2f} ms  peak "
                                              f"{found['forward_backward_peak_bytes'] / 2**20:8.1f} MiB")
                print(f"{name:9s} L={length:6d} {row:12s} {text}", flush=True)
            if args.json:  # after every length: a timeout still leaves what was measured
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
