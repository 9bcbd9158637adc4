"""``reformer-core generate``: continue a text prompt with a saved model, streaming the text.

The model comes from ``--checkpoint`` (a ``save_checkpoint`` file, ``.npz`` or
``.safetensors``) or ``--pretrained`` (an HF Reformer folder). Text is tokenized byte-level
(id = byte + 2, the enwik8 model's convention) unless a sentencepiece tokenizer is found in
the pretrained folder or named with ``--tokenizer``. Each new token goes through
``reformer_core.generate``'s ``on_token`` callback, which prints its decoded piece and
flushes, so the text appears as it is generated. Errors exit with status 2 and say which flag
to change.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_arguments", "run"]

PROG = "reformer-core generate"


class _Usage(Exception):
    """A problem with the command line: printed as ``error: ...``, exit status 2."""


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (0 is greedy), got {text!r}")
    return value


def _top_p(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``reformer-core generate``'s arguments."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="PATH", help="a checkpoint written by save_checkpoint or "
                        "reformer-core train/convert (.npz or .safetensors)")
    source.add_argument("--pretrained", metavar="DIR", help="an HF Reformer folder (config.json + model.safetensors "
                        "or pytorch_model.bin)")
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    parser.add_argument("--max-new-tokens", required=True, type=_non_negative_int, metavar="N",
                        help="how many tokens to generate")
    parser.add_argument("--temperature", type=_temperature, default=1.0,
                        help="sampling temperature; 0 is greedy decoding (default 1.0)")
    parser.add_argument("--top-k", type=_positive_int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=_top_p, default=None, help="nucleus sampling: keep this probability mass")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="the sampling seed (default 0)")
    parser.add_argument("--backend", default=None,
                        help="numpy, torch, jax, ... (default: $REFORMER_BACKEND, else numpy)")
    parser.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32", "float64"),
                        help="cast the weights (default: as stored)")
    parser.add_argument("--tokenizer", default="auto", metavar="auto|bytes|DIR",
                        help="auto (default): the pretrained folder's sentencepiece tokenizer if it has one, else "
                             "bytes; bytes: UTF-8 bytes as ids byte+2 (the enwik8 convention); DIR: a folder with "
                             "spiece.model or tokenizer.json")


def _load_model(args):
    from .._io.checkpoint import load_checkpoint
    from .._io.hf import from_pretrained
    from .._registry import resolve_backend

    try:
        backend = resolve_backend(args.backend)
    except (ValueError, TypeError, ImportError) as error:
        raise _Usage(f"--backend {args.backend}: {error}") from None
    flag, path = ("--checkpoint", args.checkpoint) if args.checkpoint else ("--pretrained", args.pretrained)
    if not os.path.exists(path):
        raise _Usage(f"{flag} {path}: no such {'file' if flag == '--checkpoint' else 'folder'}")
    if flag == "--checkpoint" and os.path.isdir(path):
        raise _Usage(f"--checkpoint {path} is a folder; for an HF model folder use --pretrained {path}")
    if flag == "--pretrained" and not os.path.isdir(path):
        raise _Usage(f"--pretrained {path} is a file; for a reformer-core checkpoint use --checkpoint {path}")
    try:
        if flag == "--checkpoint":
            checkpoint = load_checkpoint(path, backend=backend, dtype=args.dtype)
            params, config = checkpoint.params, checkpoint.config
        else:
            params, config = from_pretrained(path, backend=backend, dtype=args.dtype)
    except TypeError as error:
        if "bfloat16" in str(error):
            raise _Usage(f"{flag} {path} stores bfloat16 weights, which --backend {backend.name} cannot hold: pass "
                         f"--dtype float32 (exact) or --backend torch") from None
        raise _Usage(f"{flag} {path}: {error}") from None
    except (ValueError, ImportError, OSError) as error:
        raise _Usage(f"{flag} {path}: {error}") from None
    if not config.causal:
        raise _Usage(f"{flag} {path} is not a causal language model (a masked LM sees later positions); "
                     f"generate needs a ReformerModelWithLMHead / causal=True model")
    return backend, params, config


def _tokenizer(args, config):
    from .._io.tokenizers import ByteTokenizer, SentencePieceTokenizer, has_tokenizer_files

    spec = args.tokenizer
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "auto":
        if args.pretrained and has_tokenizer_files(args.pretrained):
            folder = args.pretrained
        else:
            return ByteTokenizer()
    else:
        folder = spec
        if not has_tokenizer_files(folder):
            raise _Usage(f"--tokenizer {spec}: not 'auto', 'bytes' or a folder holding one of spiece.model, "
                         f"tokenizer.json")
    try:
        return SentencePieceTokenizer(folder)
    except ImportError as error:
        raise _Usage(f"{error}") from None
    except (OSError, ValueError, TypeError) as error:
        raise _Usage(f"--tokenizer: cannot load the tokenizer in {folder}: {error}; pass --tokenizer bytes to use "
                     f"the byte-level one") from None


def _check_lengths(config, ids, max_new_tokens):
    from .generate import padded_length

    length, limit = len(ids), config.max_length
    if length > limit:
        raise _Usage(f"--prompt is {length} tokens, longer than the model's maximum length of {limit} "
                     f"(prod(axial_pos_shape)); shorten --prompt")
    # the longest new-token count the model can run: the total within the limit, and the last
    # step's prefix padded to the chunk lengths within it too (as reformer_core.generate checks)
    most = limit - length
    while most > 0 and padded_length(config, length + most - 1) > limit:
        most -= 1
    if max_new_tokens > most:
        raise _Usage(f"--max-new-tokens {max_new_tokens} is too many: the --prompt is {length} tokens and the model "
                     f"runs at most {limit} positions, so at most {most} new tokens fit; lower --max-new-tokens"
                     + (" or shorten --prompt" if length > 1 else ""))


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """``reformer-core generate``."""
    try:
        return _run(args)
    except _Usage as error:
        sys.stdout.flush()
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import numpy as np

    from . import generate as generate_module

    if args.prompt == "":
        raise _Usage("--prompt is empty; give at least one character to continue")
    backend, params, config = _load_model(args)
    tokenizer = _tokenizer(args, config)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise _Usage(f"--prompt {args.prompt!r} encodes to no tokens with the {tokenizer.name} tokenizer; "
                     f"give other text")
    if max(ids) >= config.vocab_size:
        hint = ("the byte-level tokenizer maps byte b to id b + 2, so it needs a vocabulary of 258 ids; pass "
                "--tokenizer DIR with the model's own tokenizer" if tokenizer.name == "bytes"
                else "pass --tokenizer with the tokenizer the model was trained with")
        raise _Usage(f"--prompt has token id {max(ids)}, outside the model's vocabulary of {config.vocab_size} ids: "
                     f"{hint}")
    _check_lengths(config, ids, args.max_new_tokens)
    prompt = backend.from_numpy(np.asarray([ids], dtype=np.int64))
    piece = tokenizer.stream()
    out = sys.stdout

    def on_token(tokens) -> None:
        out.write(piece(int(tokens[0])))
        out.flush()

    try:
        generate_module.generate(params, config, prompt, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, seed=args.seed, on_token=on_token)
    except (ValueError, TypeError) as error:
        raise _Usage(str(error)) from None
    out.write("\n")
    out.flush()
    return 0
