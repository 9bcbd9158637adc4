"""Tokens/s of a whole training step: ``ReformerLM`` against HF's ``ReformerModelWithLMHead``.

Not run in CI. ``python bench/train_step.py --lengths 4096 16384`` (needs torch and
transformers). Both models hold the same weights: a random HF model is saved and loaded with
``ReformerLM.from_pretrained``. One step is the forward in training mode (fresh LSH rotations
each call, HF's reversible backward on its side), the cross-entropy of the next token, and the
backward into every parameter; no optimiser. The two run alternately (A B A B, one warm-up each),
so load from other processes hits both alike; the ratio is taken round by round.

Default shapes are the issue's: 12 LSH layers, d_model 256, 4 heads of 64, d_ff 1024, 2 hashes,
chunks of 64, causal, batch 1, vocabulary 256, float32, dropout off.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile

from reformer_core.bench.threads import load_average, pinned_threads
from reformer_core.bench.timing import paired_ratio, summarize, time_round_robin


def _hf_model(length: int, args):
    import transformers

    from reformer_core.bench.peers import bucket_list

    side = 2 ** math.ceil(math.log2(math.sqrt(length)))
    config = transformers.ReformerConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, num_attention_heads=args.heads,
        attention_head_size=args.d_model // args.heads, feed_forward_size=args.d_ff,
        attn_layers=["lsh"] * args.layers, num_hashes=args.hashes, lsh_attn_chunk_length=args.chunk,
        num_buckets=bucket_list(length, args.chunk), is_decoder=True, axial_pos_shape=[side, length // side],
        axial_pos_embds_dim=[args.d_model // 2, args.d_model - args.d_model // 2], max_position_embeddings=length,
        hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
        axial_pos_embds=True, hidden_act="relu", chunk_size_lm_head=0, tie_word_embeddings=False,
    )
    return transformers.ReformerModelWithLMHead(config)


def _step(model, tokens, logits_of):
    import torch

    def step():
        model.zero_grad(set_to_none=True)
        logits = logits_of(model, tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        return loss

    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--hashes", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from reformer_core.backends.torch import ReformerLM

    transformers.logging.set_verbosity_error()
    rows = []
    with pinned_threads(args.threads) as threads:
        print(f"threads={threads.get('torch')} blas={threads.get('blas')} load={load_average()} torch={torch.__version__} "
              f"transformers={transformers.__version__}")
        for length in args.lengths:
            torch.manual_seed(0)
            hf = _hf_model(length, args).train()
            with tempfile.TemporaryDirectory() as folder:
                hf.save_pretrained(folder)
                ours = ReformerLM.from_pretrained(folder).train()
            # length + 1 tokens: the step predicts tokens 1..length from 0..length-1
            tokens = torch.randint(0, args.vocab, (1, length + 1), generator=torch.Generator().manual_seed(length))
            calls = [(_step(ours, tokens, lambda m, t: m(t)), lambda _: None),
                     (_step(hf, tokens, lambda m, t: m(input_ids=t).logits), lambda _: None)]
            (our_first, our_times), (hf_first, hf_times) = time_round_robin(calls, warmup=1, repeats=args.repeats)
            row = {"length": length, "reformer_core": summarize(our_times), "hf": summarize(hf_times),
                   "hf_over_ours": paired_ratio(hf_times, our_times),
                   "tokens_per_s": {"reformer_core": length / statistics.median(our_times),
                                    "hf": length / statistics.median(hf_times)}}
            rows.append(row)
            print(f"L={length}: reformer-core median {row['reformer_core']['median_s']:.2f} s "
                  f"({min(our_times):.2f}-{max(our_times):.2f}), HF {row['hf']['median_s']:.2f} s "
                  f"({min(hf_times):.2f}-{max(hf_times):.2f}); tokens/s {row['tokens_per_s']['reformer_core']:.0f} "
                  f"vs {row['tokens_per_s']['hf']:.0f}; HF/ours per round {row['hf_over_ours']} "
                  f"(rounds: {[round(h / o, 2) for h, o in zip(hf_times, our_times)]})", flush=True)
            del hf, ours
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
