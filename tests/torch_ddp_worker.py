"""Run by test_torch_backend.py in a subprocess: ReformerLM under DistributedDataParallel
with 2 gloo processes on CPU, against one process on the full batch.

Usage: python torch_ddp_worker.py OUT_FILE. Writes, per DDP variant, the largest absolute
difference between the parameters after 3 optimiser steps with DDP (rank 0) and without.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import reformer_core as rc
from reformer_core.backends.torch.nn import ReformerLM

CONFIG = rc.ReformerConfig(vocab_size=16, d_model=8, num_heads=2, head_dim=4, d_ff=16,
                           attention_layers=("lsh", "local"), num_hashes=2, num_buckets=4, lsh_chunk_length=4,
                           local_chunk_length=4, axial_pos_shape=(4, 4), causal=True)
# (name, DDP keyword arguments, optimiser)
VARIANTS = [("default", {}, "sgd"), ("static_graph", {"static_graph": True}, "adam"),
            ("find_unused_parameters", {"find_unused_parameters": True}, "sgd")]
STEPS, BATCH, LENGTH = 3, 4, 16


def batches():
    rng = np.random.default_rng(7)
    return [torch.from_numpy(rng.integers(0, CONFIG.vocab_size, (BATCH, LENGTH + 1))) for _ in range(STEPS)]


def optimiser(kind, params):
    return torch.optim.SGD(params, lr=0.5) if kind == "sgd" else torch.optim.Adam(params, lr=1e-2)


def train(model, kind, rank=0, world=1):
    opt = optimiser(kind, model.parameters())
    share = BATCH // world
    for data in batches():
        data = data[rank * share:(rank + 1) * share]
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, CONFIG.vocab_size), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def rank_main(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for name, kwargs, kind in VARIANTS:
        model = DistributedDataParallel(ReformerLM(CONFIG, seed=1, dtype=torch.float64), **kwargs)
        try:
            train(model, kind, rank, world)
        except Exception as error:  # reported, not hidden: the test shows the message
            results[name] = f"error: {type(error).__name__}: {error}"
            continue
        reference = ReformerLM(CONFIG, seed=1, dtype=torch.float64)
        train(reference, kind)
        results[name] = float((flat(model.module) - flat(reference)).abs().max())
    if rank == 0:
        with open(out_file, "w", encoding="utf-8") as handle:
            json.dump(results, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(rank_main, args=(2, os.path.join(folder, "init"), sys.argv[1]), nprocs=2, join=True)
