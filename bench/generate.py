"""Tokens/s of cached generation (``reformer_core.generate``) against recomputing the prefix.

Not run in CI. ``python -m reformer_core.bench.generate --backends numpy torch --new 256``
(or ``python bench/generate.py`` in a checkout). The uncached loop is the exactness
reference: per token, ``apply`` on the prefix padded to a multiple of the chunk lengths and
the argmax at its last real position. Both produce the same greedy tokens (checked here).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

import reformer_core as rc


def _config(args) -> rc.ReformerConfig:
    length = args.prompt + args.new
    side = 2 ** math.ceil(math.log2(math.sqrt(length)))
    return rc.ReformerConfig(
        vocab_size=args.vocab, d_model=args.d_model, num_heads=args.heads, head_dim=args.d_model // args.heads,
        d_ff=2 * args.d_model, attention_layers=tuple(args.layers), num_hashes=2, num_buckets=None,
        lsh_chunk_length=args.chunk, local_chunk_length=args.chunk,
        axial_pos_shape=(side, max(side, -(-length // side))),
    )


def _uncached(params, config, prompt, new, convert, to_host):
    reference = config.replace(num_buckets=config.num_buckets_for(config.max_length)) \
        if "lsh" in config.attention_layers and config.num_buckets is None else config
    multiple = math.lcm(*[reference.lsh_chunk_length if k == "lsh" else reference.local_chunk_length
                          for k in set(reference.attention_layers) if k != "full"] or [1])
    tokens = np.array(prompt)
    for _ in range(new):
        n = tokens.shape[1]
        total = -(-n // multiple) * multiple
        padded = np.concatenate([tokens, np.zeros((tokens.shape[0], total - n), np.int64)], axis=1)
        mask = np.ascontiguousarray(np.broadcast_to(np.arange(total) < n, padded.shape))
        logits = to_host(rc.apply(params, convert(padded), reference, attention_mask=convert(mask)))
        tokens = np.concatenate([tokens, np.argmax(logits[:, n - 1], axis=-1)[:, None]], axis=1)
    return tokens


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["numpy", "torch"])
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", nargs="+", default=["local", "lsh"])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-uncached", action="store_true")
    args = parser.parse_args(argv)
    config = _config(args)
    prompt = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.prompt))
    print(f"layers={list(config.attention_layers)} d_model={config.d_model} vocab={config.vocab_size} "
          f"chunk={args.chunk} batch={args.batch} prompt={args.prompt} new={args.new} threads={args.threads}")
    print(f"{'backend':8s} {'cached tok/s':>13s} {'uncached tok/s':>15s} {'speed-up':>9s}  same tokens")
    for name in args.backends:
        if name == "torch":
            import torch

            torch.set_num_threads(args.threads)
            convert, to_host = (lambda a: torch.from_numpy(np.array(a))), (lambda t: t.double().numpy())
        else:
            convert, to_host = (lambda a: a), np.asarray
        params = rc.init_params(config, seed=0, backend=name)
        rc.generate(params, config, convert(prompt), 4, temperature=0)  # warm up
        start = time.perf_counter()
        cached = to_host(rc.generate(params, config, convert(prompt), args.new, temperature=0))
        cached_rate = args.new * args.batch / (time.perf_counter() - start)
        if args.skip_uncached:
            print(f"{name:8s} {cached_rate:13.1f}")
            continue
        start = time.perf_counter()
        uncached = _uncached(params, config, prompt, args.new, convert, to_host)
        uncached_rate = args.new * args.batch / (time.perf_counter() - start)
        print(f"{name:8s} {cached_rate:13.1f} {uncached_rate:15.1f} {cached_rate / uncached_rate:8.1f}x  "
              f"{np.array_equal(cached, uncached)}")


if __name__ == "__main__":
    main()
