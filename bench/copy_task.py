"""The paper's duplication task (Reformer section 2.1): sequences ``0 w 0 w``, training on
any backend, evaluation with 1-8 hashes and full attention (Table 2), and ``reformer-core train``."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from reformer_core import Adam, ReformerConfig, apply, init_params, save_checkpoint, value_and_grad, warmup_inverse_sqrt
from reformer_core._progress import Progress
from reformer_core._registry import resolve_backend

__all__ = [
    "copy_task_batch",
    "copy_task_targets",
    "copy_task_accuracy",
    "CopyTaskSettings",
    "copy_task_config",
    "copy_task_score",
    "evaluate_copy_task",
    "train_copy_task",
    "add_arguments",
    "run",
]


def copy_task_batch(rng: np.random.Generator, batch: int, length: int, vocab_size: int = 128) -> np.ndarray:
    """``(batch, length)`` int64 sequences ``0 w 0 w`` with ``w`` uniform over ``1 .. vocab_size-1``.

    ``length`` must be even; ``|w| = length / 2 - 1`` (the paper: 511 of 1024, symbols 1..127).
    """
    if length < 4 or length % 2:
        raise ValueError(f"the duplication task needs an even length >= 4, got {length}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    half = length // 2
    words = rng.integers(1, vocab_size, size=(batch, half - 1), dtype=np.int64)
    zeros = np.zeros((batch, 1), dtype=np.int64)
    return np.concatenate([zeros, words, zeros, words], axis=1)


def copy_task_targets(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Next-token targets and loss weights scoring only the predictable second-half tokens.

    Position p predicts token p + 1; the weights are 1 for ``p`` in ``[L/2, L-2]``, whose
    targets are the second copy of ``w``, and 0 elsewhere (the last position has no target).
    """
    batch, length = tokens.shape
    targets = np.concatenate([tokens[:, 1:], np.zeros((batch, 1), dtype=tokens.dtype)], axis=1)
    weights = np.zeros((batch, length), dtype=np.float64)
    weights[:, length // 2 : length - 1] = 1.0
    return targets, weights


def copy_task_accuracy(logits: Any, targets: np.ndarray, weights: np.ndarray, to_numpy=np.asarray) -> float:
    """Fraction of scored positions whose argmax prediction is the target."""
    predictions = np.argmax(to_numpy(logits), axis=-1)
    scored = weights > 0
    return float(np.mean(predictions[scored] == targets[scored]))


@dataclass(frozen=True)
class CopyTaskSettings:
    """What ``reformer-core train --task copy`` runs (defaults: a 1-layer model at L=128)."""

    length: int = 128
    steps: int = 2000
    batch: int = 16
    seed: int = 0
    vocab_size: int = 128
    d_model: int = 128
    num_heads: int = 4
    d_ff: int = 128
    attention: str = "lsh"
    num_hashes: int = 2
    chunk_length: int = 16
    learning_rate: float = 2e-3
    warmup_steps: int = 200
    eval_hashes: tuple[int, ...] = (1, 2, 4, 8)
    eval_batches: int = 4
    eval_every: int = 100
    dtype: str = "float32"
    time_limit: float | None = None  # seconds; stop training early when reached


def copy_task_config(settings: CopyTaskSettings) -> ReformerConfig:
    """The model: one reversible layer, shared-QK attention, a plain learned position embedding.

    A single axial axis is an ordinary learned embedding. Factorised axes would tie the
    embedding of position p to its axial coordinates, and the task needs position p to
    match position ``p - (L/2 - 1)`` exactly, which a shared-QK (symmetric) score can only
    express by making those two embeddings alike.
    """
    length = settings.length
    return ReformerConfig(
        vocab_size=settings.vocab_size,
        d_model=settings.d_model,
        num_heads=settings.num_heads,
        head_dim=settings.d_model // settings.num_heads,
        d_ff=settings.d_ff,
        attention_layers=(settings.attention,),
        num_hashes=settings.num_hashes,
        lsh_chunk_length=settings.chunk_length,
        local_chunk_length=settings.chunk_length,
        causal=True,
        axial_pos_shape=(length,),
    )


def copy_task_score(params, config: ReformerConfig, backend, *, length: int, batches: int = 4, batch: int = 16,
                    seed: int = 10_000) -> float:
    """Second-half accuracy of ``config`` on ``batches`` fresh batches (seeded, so comparable)."""
    rng = np.random.default_rng(seed)
    correct = []
    for i in range(batches):
        tokens = copy_task_batch(rng, batch, length, config.vocab_size)
        targets, weights = copy_task_targets(tokens)
        logits = apply(params, backend.from_numpy(tokens), config, rotations_seed=seed + i)
        correct.append(copy_task_accuracy(logits, targets, weights, to_numpy=backend.to_numpy))
    return float(np.mean(correct))


def evaluate_copy_task(params, config: ReformerConfig, backend, *, length: int, hashes=(1, 2, 4, 8),
                       batches: int = 4, batch: int = 16, seed: int = 10_000) -> dict[str, float]:
    """Accuracy with LSH attention at each hash count (``"lsh-N"``) and with full attention (``"full"``).

    Shared-QK "lsh" and "full" layers have the same parameters, so a model trained with one
    can be evaluated with the other, as in the paper's Table 2.
    """
    results = {}
    for hash_count in hashes:
        lsh = config.replace(attention_layers=("lsh",) * config.num_layers, num_hashes=hash_count)
        results[f"lsh-{hash_count}"] = copy_task_score(params, lsh, backend, length=length, batches=batches,
                                                       batch=batch, seed=seed)
    full = config.replace(attention_layers=("full",) * config.num_layers)
    results["full"] = copy_task_score(params, full, backend, length=length, batches=batches, batch=batch, seed=seed)
    return results


@dataclass
class TrainingRecord:
    settings: CopyTaskSettings
    curve: list[dict] = field(default_factory=list)  # {"step", "loss", "accuracy"?, "seconds"}
    final: dict = field(default_factory=dict)
    params: Any = None  # the trained parameters
    config: ReformerConfig | None = None


def train_copy_task(settings: CopyTaskSettings, backend, *, progress: Callable[[int, float, float], None] | None = None):
    """Train a 1-layer Reformer on ``0 w 0 w`` and evaluate it with several hash counts.

    Rotations are resampled every step (``rotations_seed = step``). Returns a
    :class:`TrainingRecord` with the learning curve and the final metrics (loss, accuracy
    per evaluation hash count, steps, seconds).
    """
    config = copy_task_config(settings)
    params = init_params(config, settings.seed, backend=backend, dtype=settings.dtype)
    optimizer = Adam(learning_rate=warmup_inverse_sqrt(settings.learning_rate, settings.warmup_steps))
    state = optimizer.init(params)
    rng = np.random.default_rng(settings.seed)
    record = TrainingRecord(settings)
    start = time.perf_counter()
    loss_value = float("nan")
    step = 0
    for step in range(1, settings.steps + 1):
        tokens = copy_task_batch(rng, settings.batch, settings.length, settings.vocab_size)
        targets, weights = copy_task_targets(tokens)
        loss, grads = value_and_grad(
            params, backend.from_numpy(tokens), backend.from_numpy(targets), config,
            weights=backend.from_numpy(weights, dtype=settings.dtype), rotations_seed=step,
        )
        params, state = optimizer.update(params, grads, state)
        loss_value = float(backend.to_numpy(loss))
        elapsed = time.perf_counter() - start
        point = {"step": step, "loss": loss_value, "seconds": round(elapsed, 3)}
        if settings.eval_every and step % settings.eval_every == 0:
            point["accuracy"] = copy_task_score(params, config, backend, length=settings.length, batches=1,
                                                batch=settings.batch)
        record.curve.append(point)
        if progress is not None:
            progress(step, loss_value, settings.batch * settings.length * step / max(elapsed, 1e-9))
        if not math.isfinite(loss_value):
            break
        if settings.time_limit is not None and elapsed > settings.time_limit:
            break
    train_seconds = time.perf_counter() - start
    accuracy = evaluate_copy_task(params, config, backend, length=settings.length, hashes=settings.eval_hashes,
                                  batches=settings.eval_batches, batch=settings.batch)
    record.final = {
        "loss": loss_value,
        "accuracy": accuracy,
        "steps": step,
        "seconds": round(train_seconds, 2),
        "backend": backend.name,
        "device": str(backend.device),
    }
    record.params = params
    record.config = config
    return record


def format_training_report(record: TrainingRecord) -> str:
    """The learning curve at the evaluation points and the final accuracy table."""
    lines = ["step      loss   accuracy   seconds"]
    for point in record.curve:
        if "accuracy" in point:
            lines.append(f"{point['step']:>5}  {point['loss']:8.4f}   {point['accuracy']:7.1%}   {point['seconds']:7.1f}")
    final = record.final
    lines.append("")
    lines.append(f"trained {final['steps']} steps in {final['seconds']:.1f} s on {final['backend']} ({final['device']}), "
                 f"final loss {final['loss']:.4f}")
    lines.append("second-half accuracy by attention used in evaluation:")
    lines.append("  " + "   ".join(f"{name}: {value:.1%}" for name, value in final["accuracy"].items()))
    return "\n".join(lines)


def add_arguments(parser) -> None:
    """``reformer-core train``'s arguments."""
    parser.add_argument("--task", choices=("copy",), default="copy", help="the task (only 'copy' for now)")
    parser.add_argument("--backend", default=None, help="backend name, e.g. numpy or strict:device1 (default: current)")
    parser.add_argument("--length", type=int, default=128, help="sequence length, even (default 128)")
    parser.add_argument("--steps", type=int, default=2000, help="optimiser steps (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hashes", type=int, default=2, help="LSH hash rounds while training (default 2)")
    parser.add_argument("--attention", choices=("lsh", "full", "local"), default="lsh",
                        help="attention used while training (default lsh)")
    parser.add_argument("--chunk-length", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--time-limit", type=float, metavar="SECONDS", help="stop training after this long")
    parser.add_argument("--json", metavar="PATH", help="write final metrics and the learning curve as JSON")
    parser.add_argument("--checkpoint", metavar="PATH", help="save the trained parameters here (.npz)")
    parser.add_argument("--no-progress", action="store_true")


def run(args, argv=None) -> int:
    """``reformer-core train`` (``args`` from argparse)."""
    import json
    import os
    import sys

    try:
        backend = resolve_backend(args.backend)
        settings = CopyTaskSettings(
            length=args.length, steps=args.steps, batch=args.batch, seed=args.seed, num_hashes=args.hashes,
            attention=args.attention, chunk_length=args.chunk_length, d_model=args.d_model, d_ff=args.d_model,
            learning_rate=args.learning_rate, time_limit=args.time_limit,
        )
        copy_task_config(settings).validate_length(settings.length)
        if settings.length % 2 or settings.length < 4:
            raise ValueError(f"--length must be even and >= 4, got {settings.length}")
    except (ValueError, TypeError) as error:
        print(f"reformer-core train: error: {error}", file=sys.stderr)
        return 2
    with Progress(settings.steps, label="train", enabled=not args.no_progress) as bar:
        record = train_copy_task(
            settings, backend, progress=lambda step, loss, rate: bar.step(f"loss {loss:.4f}, {rate:,.0f} tokens/s"))
    print(format_training_report(record))
    if args.json:
        report = {"schema": "reformer-core-train/1", "settings": {**vars(settings), "eval_hashes": list(settings.eval_hashes)},
                  "config": record.config.to_dict(), "final": record.final, "curve": record.curve}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
    if args.checkpoint:
        save_checkpoint(args.checkpoint, record.params, record.config, metadata={"final": record.final})
    return 0 if math.isfinite(record.final["loss"]) else 1
