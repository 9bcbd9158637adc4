"""The paper's duplication task (Reformer section 2.1): sequences ``0 w 0 w``, training on
any backend, evaluation with 1-8 hashes and full attention (Table 2), and ``reformer-core train``."""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from reformer_core import (Adam, ReformerConfig, apply, init_params, load_checkpoint, save_checkpoint, value_and_grad,
                           warmup_inverse_sqrt)
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
    "TrainingState",
    "save_training_checkpoint",
    "load_training_checkpoint",
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
class TrainingState:
    """Where a run stands after ``step`` optimiser steps: enough to continue it exactly."""

    params: Any
    optimizer_state: Any  # Adam's {"step", "m", "v"}
    step: int
    rng_state: dict  # the data generator's bit_generator.state (the next batches)


@dataclass
class TrainingRecord:
    settings: CopyTaskSettings
    curve: list[dict] = field(default_factory=list)  # {"step", "loss", "accuracy"?, "seconds"}
    final: dict = field(default_factory=dict)
    params: Any = None  # the trained parameters
    config: ReformerConfig | None = None
    state: TrainingState | None = None  # the end of the run, for a checkpoint to resume from


#: settings a resumed run may change (the others define the run and must match the checkpoint)
RESUMABLE_CHANGES = ("steps", "time_limit", "eval_every", "eval_batches", "eval_hashes")

#: CopyTaskSettings field -> the `reformer-core train` flag that sets it
SETTING_FLAGS = {"length": "--length", "batch": "--batch", "seed": "--seed", "num_hashes": "--hashes",
                 "attention": "--attention", "chunk_length": "--chunk-length", "d_model": "--d-model",
                 "d_ff": "--d-model", "learning_rate": "--learning-rate"}


def _settings_dict(settings: CopyTaskSettings) -> dict:
    return {**vars(settings), "eval_hashes": list(settings.eval_hashes)}


def save_training_checkpoint(path, record: "TrainingRecord") -> None:
    """Parameters, Adam state, step, data-generator state and settings, in one ``.npz`` checkpoint."""
    state = record.state
    save_checkpoint(path, state.params, record.config, optimizer_state=state.optimizer_state, metadata={
        "final": record.final,
        "train": {"task": "copy", "step": state.step, "rng_state": state.rng_state,
                  "settings": _settings_dict(record.settings)},
    })


def load_training_checkpoint(path, settings: CopyTaskSettings, backend) -> TrainingState:
    """The state saved by :func:`save_training_checkpoint`, checked against ``settings``.

    Raises ``ValueError`` (naming the flags) when the checkpoint is not a ``train`` checkpoint or
    was trained with other settings than those that define the run.
    """
    checkpoint = load_checkpoint(path, backend=backend)
    train = checkpoint.metadata.get("train") if isinstance(checkpoint.metadata, dict) else None
    if not train or checkpoint.optimizer_state is None:
        raise ValueError(f"--resume {path}: not a checkpoint of `reformer-core train --checkpoint` "
                         "(it has no optimizer state and step)")
    saved = train["settings"]
    current = _settings_dict(settings)
    differ = [name for name in saved if name not in RESUMABLE_CHANGES and saved[name] != current.get(name)]
    if differ:
        flags = " ".join(dict.fromkeys(f"{SETTING_FLAGS[name]} {saved[name]}" for name in differ if name in SETTING_FLAGS))
        others = [name for name in differ if name not in SETTING_FLAGS]
        raise ValueError(f"--resume {path}: the checkpoint was trained with other settings; pass {flags or ''}"
                         f"{' (and ' + ', '.join(others) + ')' if others else ''} to continue it "
                         f"(only --steps and --time-limit may change)")
    if settings.steps <= train["step"]:
        raise ValueError(f"--resume {path}: the checkpoint is at step {train['step']}; "
                         f"--steps is the total, so pass --steps above {train['step']}")
    return TrainingState(checkpoint.params, checkpoint.optimizer_state, int(train["step"]), train["rng_state"])


def train_copy_task(settings: CopyTaskSettings, backend, *, progress: Callable[[int, float, float], None] | None = None,
                    resume: TrainingState | None = None, should_stop: Callable[[], bool] | None = None):
    """Train a 1-layer Reformer on ``0 w 0 w`` and evaluate it with several hash counts.

    Rotations are resampled every step (``rotations_seed = step``). Returns a
    :class:`TrainingRecord` with the learning curve and the final metrics (loss, accuracy
    per evaluation hash count, steps, seconds), and the state to continue from. With
    ``resume`` (a :class:`TrainingState`, e.g. from :func:`load_training_checkpoint`) the run
    continues from that step to ``settings.steps`` with the same batches, rotations and Adam
    state an uninterrupted run would have had, so its losses are the same (bit for bit on NumPy).
    ``should_stop()``, asked after every step, ends training early (``reformer-core train`` on Ctrl-C),
    between steps, so the state stays resumable.
    """
    config = copy_task_config(settings)
    optimizer = Adam(learning_rate=warmup_inverse_sqrt(settings.learning_rate, settings.warmup_steps))
    rng = np.random.default_rng(settings.seed)
    if resume is None:
        params = init_params(config, settings.seed, backend=backend, dtype=settings.dtype)
        state = optimizer.init(params)
        first = 1
    else:
        params, state, first = resume.params, resume.optimizer_state, resume.step + 1
        rng.bit_generator.state = resume.rng_state
    record = TrainingRecord(settings)
    start = time.perf_counter()
    loss_value = float("nan")
    step = first - 1
    for step in range(first, settings.steps + 1):
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
            progress(step, loss_value, settings.batch * settings.length * (step - first + 1) / max(elapsed, 1e-9))
        if not math.isfinite(loss_value):
            break
        if settings.time_limit is not None and elapsed > settings.time_limit:
            break
        if should_stop is not None and should_stop():
            record.final["interrupted"] = True
            break
    train_seconds = time.perf_counter() - start
    accuracy = evaluate_copy_task(params, config, backend, length=settings.length, hashes=settings.eval_hashes,
                                  batches=settings.eval_batches, batch=settings.batch)
    record.final = {
        **record.final,
        "loss": loss_value,
        "accuracy": accuracy,
        "steps": step,
        "seconds": round(train_seconds, 2),
        "backend": backend.name,
        "device": str(backend.device),
    }
    record.params = params
    record.config = config
    record.state = TrainingState(params, state, step, rng.bit_generator.state)
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
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="save the parameters, optimizer state, step and data position here (.npz)")
    parser.add_argument("--resume", metavar="PATH",
                        help="continue the run saved by --checkpoint PATH up to --steps (the total), exactly as "
                             "if it had not stopped; the other flags must be those it was trained with")
    parser.add_argument("--no-progress", action="store_true")


def _check_length(settings: CopyTaskSettings) -> None:
    """``--length`` against the task and ``--chunk-length``, naming the nearest lengths that work."""
    length, chunk = settings.length, settings.chunk_length
    if chunk < 1:
        raise ValueError(f"--chunk-length must be positive, got {chunk}")

    def works(n: int) -> bool:
        return n >= 4 and n % 2 == 0 and (n <= chunk or n % chunk == 0)

    if works(length):
        return
    below = next((n for n in range(length - 1, 3, -1) if works(n)), None)
    above = next(n for n in range(max(length + 1, 4), length + 2 * chunk + 5) if works(n))
    near = " or ".join(f"--length {n}" for n in (below, above) if n is not None)
    tail = f", or a --chunk-length that divides {length}" if length > chunk and length % 2 == 0 else ""
    raise ValueError(f"--length {length} does not work with --chunk-length {chunk}: the duplication task needs an "
                     f"even length >= 4, and a length above the chunk length must be a multiple of it; "
                     f"pass {near}{tail}")


@contextlib.contextmanager
def _stop_on_interrupt(checkpoint):
    """The first Ctrl-C asks training to stop after the current step (then evaluate and save);
    a second one interrupts at once. Yields a function telling whether a stop was asked."""
    requested = []

    def on_interrupt(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(True)
        then = f", save {checkpoint}" if checkpoint else ""
        print(f"\nreformer-core train: stopping after this step (then evaluating{then}); Ctrl-C again aborts",
              file=sys.stderr)

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield lambda: bool(requested)
    finally:
        signal.signal(signal.SIGINT, previous)


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
        _check_length(settings)
        copy_task_config(settings).validate_length(settings.length)
        resume = load_training_checkpoint(args.resume, settings, backend) if args.resume else None
    except (ValueError, TypeError) as error:
        print(f"reformer-core train: error: {error}", file=sys.stderr)
        return 2
    first = resume.step if resume else 0
    if resume:
        print(f"resuming {args.resume} at step {first} of {settings.steps}", file=sys.stderr)
    with Progress(settings.steps - first, label="train", enabled=not args.no_progress) as bar, \
            _stop_on_interrupt(args.checkpoint) as stop_requested:
        record = train_copy_task(
            settings, backend, resume=resume, should_stop=stop_requested,
            progress=lambda step, loss, rate: bar.step(f"step {step}: loss {loss:.4f}, {rate:,.0f} tokens/s"))
    print(format_training_report(record))
    if args.json:
        report = {"schema": "reformer-core-train/1", "settings": {**vars(settings), "eval_hashes": list(settings.eval_hashes)},
                  "config": record.config.to_dict(), "final": record.final, "curve": record.curve}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
    if args.checkpoint:
        save_training_checkpoint(args.checkpoint, record)
    return 0 if math.isfinite(record.final["loss"]) else 1
