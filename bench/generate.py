"""Tokens/s of cached generation (``reformer_core.generate``) against recomputing the prefix.

Not run in CI. ``python -m reformer_core.bench.generate --backends numpy torch --new 256 1024``
(or ``python bench/generate.py`` in a checkout). The uncached loop is the exactness
reference: per token, ``apply`` on the prefix padded to a multiple of the chunk lengths and
the argmax at its last real position. Both produce the same greedy tokens (checked here).
With ``--hf`` (needs transformers and torch) the same weights, saved with
``save_pretrained``, also run HF's ``ReformerModelWithLMHead.generate`` (greedy, its cache on):
its tokens are not compared (HF redraws LSH rotations at every step without ``hash_seed``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import time

import numpy as np

import reformer_core as rc


def _config(args) -> rc.ReformerConfig:
    length = args.prompt + max(args.new)
    side = 2 ** math.ceil(math.log2(math.sqrt(length)))
    config = rc.ReformerConfig(
        vocab_size=args.vocab, d_model=args.d_model, num_heads=args.heads, head_dim=args.d_model // args.heads,
        d_ff=2 * args.d_model, attention_layers=tuple(args.layers), num_hashes=2, num_buckets=None,
        lsh_chunk_length=args.chunk, local_chunk_length=args.chunk,
        axial_pos_shape=(side, max(side, -(-length // side))),
    )
    if "lsh" in config.attention_layers:  # fixed, as generation fixes it (and HF then uses the same count)
        config = config.replace(num_buckets=config.num_buckets_for(config.max_length))
    return config


def _hf_rate(params, config, prompt, new, threads):
    """HF's greedy cached ``generate`` tokens/s on the same weights, or None without transformers."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("transformers") is None:
        return None
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    host = rc.tree_map(np.asarray, params)
    with tempfile.TemporaryDirectory() as folder:
        rc.save_pretrained(folder, host, config)
        model = transformers.ReformerModelWithLMHead.from_pretrained(folder).eval()
    ids = torch.from_numpy(np.array(prompt))
    options = dict(do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
    # transformers 5 prints a warning per step for inputs Reformer ignores: keep the table readable
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **options)  # warm up
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **options)
        elapsed = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / elapsed


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
    parser.add_argument("--new", type=int, nargs="+", default=[256], help="new-token counts, e.g. 256 1024")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", nargs="+", default=["local", "lsh"])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-uncached", action="store_true")
    parser.add_argument("--hf", action="store_true", help="also time HF transformers' generate on the same weights")
    args = parser.parse_args(argv)
    config = _config(args)
    prompt = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.prompt))
    print(f"layers={list(config.attention_layers)} d_model={config.d_model} vocab={config.vocab_size} "
          f"chunk={args.chunk} batch={args.batch} prompt={args.prompt} threads={args.threads} "
          f"max_length={config.max_length}")
    print(f"{'backend':8s} {'new':>5s} {'cached tok/s':>13s} {'uncached tok/s':>15s} {'speed-up':>9s} "
          f"{'HF tok/s':>9s}  same tokens")
    for name in args.backends:
        if name == "torch":
            import torch

            torch.set_num_threads(args.threads)
            convert, to_host = (lambda a: torch.from_numpy(np.array(a))), (lambda t: t.double().numpy())
        else:
            convert, to_host = (lambda a: a), np.asarray
        params = rc.init_params(config, seed=0, backend=name)
        rc.generate(params, config, convert(prompt), 4, temperature=0)  # warm up
        for new in args.new:
            start = time.perf_counter()
            cached = to_host(rc.generate(params, config, convert(prompt), new, temperature=0))
            cached_rate = new * args.batch / (time.perf_counter() - start)
            uncached_rate, same = None, ""
            if not args.skip_uncached:
                start = time.perf_counter()
                uncached = _uncached(params, config, prompt, new, convert, to_host)
                uncached_rate = new * args.batch / (time.perf_counter() - start)
                same = str(np.array_equal(cached, uncached))
            hf_rate = _hf_rate(params, config, prompt, new, args.threads) if args.hf and name == "torch" else None
            cells = [f"{name:8s} {new:5d} {cached_rate:13.1f}",
                     f"{uncached_rate:15.1f} {cached_rate / uncached_rate:8.1f}x" if uncached_rate else f"{'-':>15s} "
                     f"{'-':>9s}",
                     f"{hf_rate:9.1f}" if hf_rate else f"{'-':>9s}"]
            print(" ".join(cells) + f"  {same}", flush=True)


if __name__ == "__main__":
    main()
