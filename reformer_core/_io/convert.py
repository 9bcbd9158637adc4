"""``reformer-core convert SRC DST``: between HF Reformer folders and reformer-core checkpoints.

A source or destination ending in ``.npz`` or ``.safetensors`` is a reformer-core checkpoint
(``save_checkpoint``'s file); anything else is an HF folder (``config.json`` +
``model.safetensors``, which ``transformers`` loads). So ``convert hf-folder model.safetensors``
imports, ``convert model.npz hf-folder`` exports, and checkpoint to checkpoint changes the
format (HF folder to HF folder rewrites ``pytorch_model.bin`` as ``model.safetensors``).
Weights keep their dtype and bits (bfloat16 cannot go into ``.npz``: the error says to use
``.safetensors`` or ``--dtype float32``). A checkpoint's optimizer state is not exported (HF
folders hold weights only); its metadata is kept when converting between checkpoints.
Errors exit with status 2 and name the argument to change.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

__all__ = ["add_arguments", "run", "is_checkpoint_path"]

PROG = "reformer-core convert"
_SUFFIXES = (".npz", ".safetensors")


class _Usage(Exception):
    pass


def is_checkpoint_path(path: str) -> bool:
    return os.fspath(path).lower().endswith(_SUFFIXES)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``reformer-core convert``'s arguments."""
    parser.add_argument("src", metavar="SRC", help="an HF Reformer folder, or a .npz/.safetensors checkpoint")
    parser.add_argument("dst", metavar="DST", help="a .npz/.safetensors checkpoint to write, or a folder to write "
                        "as an HF Reformer folder")
    parser.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32", "float64"),
                        help="cast the weights (default: keep the stored dtype)")
    parser.add_argument("--force", action="store_true", help="overwrite DST if it exists")


def _holding_backend() -> str:
    """A backend that holds every dtype (bfloat16 too), for copying weights without arithmetic."""
    for name in ("torch", "jax"):
        if importlib.util.find_spec(name) is not None:
            return name
    return "numpy"


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """``reformer-core convert``."""
    try:
        _run(args)
    except _Usage as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


def _load(src: str, backend: str, dtype):
    from .checkpoint import load_checkpoint
    from .hf import from_pretrained

    if not os.path.exists(src):
        raise _Usage(f"SRC {src} does not exist")
    try:
        if is_checkpoint_path(src):
            if os.path.isdir(src):
                raise _Usage(f"SRC {src} is a folder; a checkpoint is a .npz or .safetensors file")
            checkpoint = load_checkpoint(src, backend=backend, dtype=dtype)
            return checkpoint.params, checkpoint.config, checkpoint.metadata
        if not os.path.isdir(src):
            raise _Usage(f"SRC {src} is neither an HF folder nor a file ending in .npz or .safetensors")
        params, config = from_pretrained(src, backend=backend, dtype=dtype)
        return params, config, {"converted_from": os.path.abspath(src)}
    except (ValueError, TypeError, ImportError, OSError) as error:
        if "bfloat16" in str(error):
            raise _Usage(f"SRC {src} stores bfloat16 weights and no installed backend holds them: install torch, or "
                         f"pass --dtype float32 (exact)") from None
        raise _Usage(f"SRC {src}: {error}") from None


def _run(args) -> None:
    from .checkpoint import save_checkpoint
    from .hf import save_pretrained

    src, dst = args.src, args.dst
    if os.path.abspath(src) == os.path.abspath(dst):
        raise _Usage("SRC and DST are the same path; give another DST")
    if os.path.exists(dst) and not args.force:
        if not os.path.isdir(dst) or os.listdir(dst):
            raise _Usage(f"DST {dst} exists; pass --force to overwrite it, or give another DST")
    if is_checkpoint_path(dst):
        if os.path.isdir(dst):
            raise _Usage(f"DST {dst} is a folder; give a file name ending in .npz or .safetensors")
        folder = os.path.dirname(os.path.abspath(dst))
        if not os.path.isdir(folder):
            raise _Usage(f"DST {dst}: folder {folder} does not exist")
    elif os.path.isfile(dst):
        raise _Usage(f"DST {dst} is a file; an HF folder is written to a folder (or end DST in .npz/.safetensors "
                     f"for a checkpoint)")
    params, config, metadata = _load(src, _holding_backend(), args.dtype)
    try:
        if is_checkpoint_path(dst):
            save_checkpoint(dst, params, config, metadata=metadata)
        else:
            save_pretrained(dst, params, config)
    except TypeError as error:
        if "bfloat16" in str(error):
            raise _Usage(f"SRC {src} holds bfloat16 weights, which a .npz checkpoint cannot store: end DST in "
                         f".safetensors, or pass --dtype float32 (exact)") from None
        raise _Usage(f"DST {dst}: {error}") from None
    except (ValueError, OSError) as error:
        raise _Usage(f"DST {dst}: {error}") from None
    kind = "checkpoint" if is_checkpoint_path(dst) else "HF folder"
    print(f"wrote {kind} {dst} ({', '.join(config.attention_layers)} layers, vocabulary {config.vocab_size})",
          file=sys.stderr)
