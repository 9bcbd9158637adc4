"""PyTorch benchmarks for issue 5: LSH attention against torch SDPA and HF transformers'
LSHSelfAttention, and the training-step memory of ReformerLM against depth.

    python bench/torch_attention.py --device cuda --json torch_bench.json
    python bench/torch_attention.py --quick            # CPU-sized: 1K-2K tokens, 1-2 hashes
    python bench/torch_attention.py --lengths 16384 --hashes 2 --depths ''   # the HF target

Attention (chunk 64, causal, 4 heads of width 64 = d_model 256), forward and
forward+backward time (median of ``--repeats``) and the forward+backward's peak memory
(CUDA allocator peak, or on the CPU sampled resident memory) of:

* ``lsh``: the core's shared-QK LSH attention (its default path: the fused kernel of
  ``backends/torch/lsh_kernel.py``) on given query/key and value heads;
* ``lsh_block``: the same plus its input projections from ``hidden`` (one bias-free
  ``Linear`` to shared-QK and values), the work HF's layer does, so the fair peer;
* ``lsh_block_standard``: ``lsh_block`` on the standard Array-API path
  (``reformer_core.standard_path()``), the reference the fused kernel is tested against;
* ``sdpa``: ``scaled_dot_product_attention`` (full causal attention) on the same heads;
* ``hf_lsh``: HF's ``LSHSelfAttention`` with the same buckets, chunks and hashes, when
  ``transformers`` is installed;
* with ``--compile``: ``lsh_jit`` and ``lsh_block_jit``, the first two through
  ``torch.compile`` (the torch backend's ``jit``; the first call per shape compiles).

The HF layer is built by :mod:`reformer_core.bench.peers`, which ``reformer-core bench`` uses
for its peer rows too.

Depth: one ``ReformerLM`` training step at ``--model-length`` for 2, 4, 8, 12 layers
(:mod:`reformer_core.bench.depth`, as ``reformer-core bench --memory --backends torch``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

import reformer_core as rc
from reformer_core.bench.memory import rss_peak, unmap_large_blocks
from reformer_core.bench.peers import bucket_list, hf_lsh_layer


def _timed(fn, device, repeats):
    fn()  # warm-up (and the first allocation)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak(fn, device):
    """Peak bytes above what was allocated before: the CUDA allocator's peak, or on the CPU the
    sampled resident memory (glibc set to unmap large blocks on free, so RSS follows tensors)."""
    if device.type != "cuda":
        return rss_peak(fn, lambda *arrays: None)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _row(fn, device, repeats):
    def forward():
        with torch.no_grad():
            fn()

    def both():
        fn()[0].sum().backward()

    return {"forward_s": _timed(forward, device, repeats), "forward_backward_s": _timed(both, device, repeats),
            "forward_backward_peak_bytes": _peak(both, device)}


def attention_cases(length, num_hashes, device, dtype, heads=4, head_dim=64, chunk=64, repeats=3, with_sdpa=True,
                    compiled=False):
    """Rows for one (length, hashes): the core's LSH attention on given shared-QK and value
    heads (``lsh``), the same with its input projections from ``hidden`` (``lsh_block``, the
    work HF's ``LSHSelfAttention`` does), SDPA full attention on the heads (``sdpa``), and
    HF's layer (``hf_lsh``) when transformers is installed."""
    rng = np.random.default_rng(0)
    width = heads * head_dim
    qk = torch.from_numpy(rng.standard_normal((1, heads, length, head_dim))).to(device, dtype).requires_grad_(True)
    v = torch.from_numpy(rng.standard_normal((1, heads, length, head_dim))).to(device, dtype).requires_grad_(True)
    hidden = torch.from_numpy(rng.standard_normal((1, length, width))).to(device, dtype).requires_grad_(True)
    projections = torch.nn.Linear(width, 2 * width, bias=False).to(device, dtype)
    buckets = rc.default_num_buckets(length, chunk)
    rotations = rc.random_rotations(0, heads, head_dim, num_hashes, buckets, like=qk.detach())
    lsh_args = {"num_buckets": buckets, "chunk_length": chunk, "causal": True}

    def lsh():
        return (rc.lsh_attention(qk, v, rotations, **lsh_args),)

    def lsh_block():
        both = projections(hidden).view(1, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        out = rc.lsh_attention(both[0], both[1], rotations, **lsh_args)
        return (out.transpose(1, 2).reshape(1, length, width),)

    def sdpa():
        return (torch.nn.functional.scaled_dot_product_attention(qk, qk, v, is_causal=True),)

    def lsh_block_standard():  # the standard Array-API path, what ran before the fused kernel
        with rc.standard_path():
            return lsh_block()

    cases = {"lsh": lsh, "lsh_block": lsh_block, "lsh_block_standard": lsh_block_standard}
    if compiled:  # the torch+jit fast path: the same functions through torch.compile
        from reformer_core._registry import resolve_backend

        jit = resolve_backend(f"torch:{device}").jit
        cases.update({"lsh_jit": jit(lsh), "lsh_block_jit": jit(lsh_block)})
    if with_sdpa:
        cases["sdpa"] = sdpa  # independent of the hash count: measured once per length
    hf = hf_lsh_layer(length, num_hashes, device, dtype, heads, head_dim, chunk)
    if hf is not None:
        cases["hf_lsh"] = lambda: hf(hidden)
    rows = {}
    for name, fn in cases.items():
        rows[name] = _row(fn, device, repeats)
        for tensor in (qk, v, hidden, *projections.parameters(), *(hf.parameters() if hf else ())):
            tensor.grad = None
    return rows


def hf_depth_rows(depths, length, device, dtype=torch.float32):
    """HF ``ReformerModelWithLMHead`` training-step peak (above its parameters and gradients) at
    the depths of ``--depths``: the peer of the ReformerLM rows, same sizes (LSH-2, chunk 64,
    d_model 256, 4 heads, d_ff 1024). None when transformers is missing."""
    try:
        from transformers import ReformerConfig, ReformerModelWithLMHead
    except ImportError:
        return None
    rows = []
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, length))).to(device)
    for depth in depths:
        config = ReformerConfig(vocab_size=256, hidden_size=256, num_attention_heads=4, attention_head_size=64,
                                feed_forward_size=1024, attn_layers=["lsh"] * depth, num_hashes=2,
                                lsh_attn_chunk_length=64, num_buckets=bucket_list(length, 64), is_decoder=True,
                                axial_pos_shape=[64, length // 64], axial_pos_embds_dim=[64, 192],
                                max_position_embeddings=length, hidden_dropout_prob=0.0,
                                lsh_attention_probs_dropout_prob=0.0, chunk_size_feed_forward=512)
        model = ReformerModelWithLMHead(config).to(device, dtype).train()

        def step():
            model(tokens, labels=tokens).loss.backward()

        step()  # warm-up; the gradients now exist and are accumulated into in place
        grad_bytes = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
        peak = max(_peak(step, device) for _ in range(2))
        rows.append({"layers": depth, "length": length, "peak_above_params_grads_bytes": peak,
                     "grad_bytes": grad_bytes})
        print(f"HF ReformerModelWithLMHead, {depth} layers, L={length}: step peak {peak / 2**20:.1f} MiB "
              f"above parameters and gradients", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--hashes", default="1,2,4,8")
    parser.add_argument("--depths", default="2,4,8,12", help="training-step memory against depth ('' to skip)")
    parser.add_argument("--model-length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd functions (torch+jit)")
    parser.add_argument("--quick", action="store_true", help="1K-2K tokens, 1-2 hashes, model length 1K")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.hashes, args.model_length, args.repeats = "1024,2048", "1,2", 1024, 2
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        unmap_large_blocks()
    report = {"device": str(device), "dtype": args.dtype, "torch": torch.__version__, "attention": [], "depth": []}
    print(f"{'L':>6} {'hashes':>6} {'impl':>18} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak MiB':>9}")
    hash_list = [int(h) for h in args.hashes.split(",")]
    for length in map(int, args.lengths.split(",")):
        for hashes in hash_list:
            rows = attention_cases(length, hashes, device, dtype, repeats=args.repeats, with_sdpa=hashes == hash_list[0],
                                   compiled=args.compile)
            for impl, row in rows.items():
                report["attention"].append({"length": length, "num_hashes": hashes, "impl": impl, **row})
                peak = row["forward_backward_peak_bytes"]
                print(f"{length:>6} {hashes:>6} {impl:>18} {row['forward_s'] * 1e3:>9.1f} "
                      f"{row['forward_backward_s'] * 1e3:>11.1f} {'-' if peak is None else f'{peak / 2**20:.1f}':>9}",
                      flush=True)
            for ours_name in ("lsh_block", "lsh_block_standard", "lsh_block_jit"):
                if "hf_lsh" not in rows or ours_name not in rows:
                    continue
                hf, ours = rows["hf_lsh"], rows[ours_name]
                memory = ("" if not (hf["forward_backward_peak_bytes"] and ours["forward_backward_peak_bytes"]) else
                          f", peak memory {ours['forward_backward_peak_bytes'] / hf['forward_backward_peak_bytes']:.2f}x HF's")
                print(f"    {ours_name}: HF's LSHSelfAttention fwd+bwd takes {hf['forward_backward_s'] / ours['forward_backward_s']:.2f}x "
                      f"as long{memory}", flush=True)
    sdpa = {r["length"]: r["forward_backward_s"] for r in report["attention"] if r["impl"] == "sdpa"}
    for hashes in hash_list:
        for impl in ("lsh", "lsh_jit"):
            wins = sorted(r["length"] for r in report["attention"] if r["impl"] == impl and r["num_hashes"] == hashes
                          and r["forward_backward_s"] < sdpa[r["length"]])
            if any(r["impl"] == impl for r in report["attention"]):
                report.setdefault("crossover", {})[f"{impl}-{hashes}"] = wins[0] if wins else None
                print(f"crossover ({impl} fwd+bwd faster than SDPA), {hashes} hashes: {wins[0] if wins else 'not reached'}")
    if args.depths:
        from reformer_core.bench.depth import backend_memory_vs_depth, format_depth_rows

        depths = tuple(int(d) for d in args.depths.split(","))
        report["depth"] = backend_memory_vs_depth(f"torch:{device}", depths, length=args.model_length,
                                                  modes=("reversible",))
        print(format_depth_rows(report["depth"]))
        report["hf_depth"] = hf_depth_rows(depths, args.model_length, device)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)
    return report


if __name__ == "__main__":
    main()
