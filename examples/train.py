"""Train a tiny Reformer for a few steps on NumPy (or torch, JAX, any backend) without a framework's optimiser.

The data is the paper's duplication task, ``0 w 0 w``: the second copy of ``w`` is predictable
from the first, so the loss (scored on the second half only) falls as the model learns to look
back. Parameters live on the chosen backend; gradients come from ``reformer_core.value_and_grad``
(hand-written rules through the reversible stack on NumPy, autodiff per block on torch/JAX).

    python examples/train.py                           # NumPy, 40 steps, about a second
    python examples/train.py --backend torch --steps 200 --checkpoint model.npz
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import reformer_core as rc


def batch_of_copies(rng, batch: int, length: int, vocab_size: int):
    """Tokens ``0 w 0 w``, next-token targets, and weights scoring the second copy only."""
    half = length // 2
    words = rng.integers(1, vocab_size, (batch, half - 1))
    zeros = np.zeros((batch, 1), dtype=words.dtype)
    tokens = np.concatenate([zeros, words, zeros, words], axis=1)
    targets = np.roll(tokens, -1, axis=1)
    weights = np.zeros((batch, length))
    weights[:, half:-1] = 1.0
    return tokens, targets, weights


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="numpy", help="numpy, strict, torch, jax, ... (default numpy)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--length", type=int, default=32, help="sequence length, a multiple of 8 (default 32)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--checkpoint", metavar="PATH", help="save parameters and optimizer state (.npz)")
    args = parser.parse_args(argv)

    config = rc.ReformerConfig(vocab_size=16, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                               attention_layers=("lsh", "lsh"), num_hashes=2, lsh_chunk_length=8,
                               axial_pos_shape=(args.length,))
    with rc.use_backend(args.backend) as backend:
        params = rc.init_params(config, seed=0)
        optimizer = rc.Adam(learning_rate=rc.warmup_inverse_sqrt(3e-3, 10))
        state = optimizer.init(params)
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        losses = []
        for step in range(1, args.steps + 1):
            tokens, targets, weights = batch_of_copies(rng, args.batch, args.length, config.vocab_size)
            loss, grads = rc.value_and_grad(params, backend.from_numpy(tokens), backend.from_numpy(targets), config,
                                            weights=backend.from_numpy(weights, dtype="float32"),
                                            rotations_seed=step)           # fresh LSH rotations each step
            params, state = optimizer.update(params, grads, state)
            losses.append(float(backend.to_numpy(loss)))
            if step == 1 or step % 5 == 0 or step == args.steps:
                print(f"step {step:4d}  loss {losses[-1]:.4f}  ({time.perf_counter() - start:.1f} s)")
        if args.checkpoint:
            rc.save_checkpoint(args.checkpoint, params, config, optimizer_state=state, metadata={"step": args.steps})
            print(f"saved {args.checkpoint}")
    if not np.isfinite(losses[-1]):
        print("the loss is not finite", file=sys.stderr)
        return 1
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps on {backend.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
