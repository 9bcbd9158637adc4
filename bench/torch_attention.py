"""PyTorch benchmarks for issue 5: LSH attention against torch SDPA, and the training-step
memory of ReformerLM against depth.

    python bench/torch_attention.py --device cuda --json torch_bench.json
    python bench/torch_attention.py --quick            # CPU-sized: 1K-2K tokens, 1-2 hashes

Attention: shared-QK LSH (chunk 64, causal, 4 heads, head width 64 = d_model 256) forward
and forward+backward time (median of ``--repeats``), and peak memory on CUDA
(``torch.cuda.max_memory_allocated`` above what the inputs hold), against
``scaled_dot_product_attention`` (full causal attention) on the same inputs. When
``transformers`` is installed, HF's ``LSHSelfAttention`` (its own projections included) is
timed beside them. Depth: one ``ReformerLM`` training step (forward, backward) at length
``--model-length`` for 2, 4, 8, 12 layers; on CUDA the peak memory above the parameters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

import reformer_core as rc
from reformer_core.backends.torch_nn import ReformerLM


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
    if device.type != "cuda":
        return None  # torch does not track CPU allocations
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def attention_cases(length, num_hashes, device, dtype, heads=4, head_dim=64, chunk=64, repeats=3):
    rng = np.random.default_rng(0)
    qk = torch.from_numpy(rng.standard_normal((1, heads, length, head_dim))).to(device, dtype).requires_grad_(True)
    v = torch.from_numpy(rng.standard_normal((1, heads, length, head_dim))).to(device, dtype).requires_grad_(True)
    buckets = rc.default_num_buckets(length, chunk)
    rotations = rc.random_rotations(0, heads, head_dim, num_hashes, buckets, like=qk.detach())

    def lsh():
        return rc.lsh_attention(qk, v, rotations, num_buckets=buckets, chunk_length=chunk, causal=True)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(qk, qk, v, is_causal=True)

    rows = {}
    for name, fn in (("lsh", lsh), ("sdpa", sdpa)):
        if name == "sdpa" and num_hashes != 1:
            continue  # independent of the hash count: measured once per length
        def forward(fn=fn):
            with torch.no_grad():
                fn()

        def both(fn=fn):
            fn().sum().backward()
            qk.grad = v.grad = None

        rows[name] = {"forward_s": _timed(forward, device, repeats), "forward_backward_s": _timed(both, device, repeats),
                      "forward_backward_peak_bytes": _peak(both, device)}
    hf = _hf_case(length, num_hashes, device, dtype, heads, head_dim, chunk, repeats)
    if hf:
        rows["hf_lsh"] = hf
    return rows


def _hf_case(length, num_hashes, device, dtype, heads, head_dim, chunk, repeats):
    try:
        from transformers import ReformerConfig
        from transformers.models.reformer.modeling_reformer import LSHSelfAttention
    except ImportError:
        return None
    config = ReformerConfig(hidden_size=heads * head_dim, num_attention_heads=heads, attention_head_size=head_dim,
                            num_hashes=num_hashes, lsh_attn_chunk_length=chunk, is_decoder=True,
                            num_buckets=rc.default_num_buckets(length, chunk), lsh_num_chunks_before=1,
                            lsh_num_chunks_after=0)
    layer = LSHSelfAttention(config).to(device, dtype)
    hidden = torch.randn(1, length, heads * head_dim, device=device, dtype=dtype, requires_grad=True)

    def forward():
        with torch.no_grad():
            layer(hidden)

    def both():
        layer(hidden)[0].sum().backward()
        hidden.grad = None
        layer.zero_grad(set_to_none=True)

    return {"forward_s": _timed(forward, device, repeats), "forward_backward_s": _timed(both, device, repeats),
            "forward_backward_peak_bytes": _peak(both, device)}


def depth_case(depth, length, device, dtype, repeats=2):
    size = int(np.ceil(np.sqrt(length)))
    config = rc.ReformerConfig(vocab_size=256, d_model=256, num_heads=4, head_dim=64, d_ff=1024,
                               attention_layers=("lsh",) * depth, num_hashes=2, lsh_chunk_length=64,
                               axial_pos_shape=(size, size), causal=True,
                               ff_chunk_length=512)
    model = ReformerLM(config, seed=0, dtype=dtype, device=device)
    tokens = torch.randint(0, 256, (1, length), device=device)

    def step():
        model(tokens).float().logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)

    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = _peak(step, device)
    return {"layers": depth, "length": length, "step_s": _timed(step, device, repeats),
            "peak_above_params_bytes": None if peak is None else peak - parameter_bytes,
            "parameter_bytes": parameter_bytes}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--hashes", default="1,2,4,8")
    parser.add_argument("--depths", default="2,4,8,12")
    parser.add_argument("--model-length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1K-2K tokens, 1-2 hashes, model length 1K")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.hashes, args.model_length, args.repeats = "1024,2048", "1,2", 1024, 2
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    report = {"device": str(device), "dtype": args.dtype, "torch": torch.__version__, "attention": [], "depth": []}
    print(f"{'L':>6} {'hashes':>6} {'impl':>7} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak MiB':>9}")
    for length in map(int, args.lengths.split(",")):
        for hashes in map(int, args.hashes.split(",")):
            rows = attention_cases(length, hashes, device, dtype, repeats=args.repeats)
            for impl, row in rows.items():
                report["attention"].append({"length": length, "num_hashes": hashes, "impl": impl, **row})
                peak = row["forward_backward_peak_bytes"]
                print(f"{length:>6} {hashes:>6} {impl:>7} {row['forward_s'] * 1e3:>9.1f} "
                      f"{row['forward_backward_s'] * 1e3:>11.1f} {'-' if peak is None else f'{peak / 2**20:.1f}':>9}")
    sdpa = {r["length"]: r["forward_backward_s"] for r in report["attention"] if r["impl"] == "sdpa"}
    for hashes in map(int, args.hashes.split(",")):
        wins = sorted(r["length"] for r in report["attention"] if r["impl"] == "lsh" and r["num_hashes"] == hashes
                      and r["forward_backward_s"] < sdpa[r["length"]])
        report.setdefault("crossover", {})[hashes] = wins[0] if wins else None
        print(f"crossover (LSH fwd+bwd faster than SDPA), {hashes} hashes: {wins[0] if wins else 'not reached'}")
    for depth in map(int, args.depths.split(",")):
        row = depth_case(depth, args.model_length, device, dtype)
        report["depth"].append(row)
        peak = row["peak_above_params_bytes"]
        print(f"depth {depth:>2} L={row['length']}: step {row['step_s'] * 1e3:.0f} ms, "
              f"peak above params {'-' if peak is None else f'{peak / 2**20:.1f} MiB'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)
    return report


if __name__ == "__main__":
    main()
