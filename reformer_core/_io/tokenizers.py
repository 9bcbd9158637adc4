"""Tokenizers for ``reformer-core generate``: byte-level built in, sentencepiece via transformers.

* :class:`ByteTokenizer`: the convention of HF's enwik8 Reformer (``google/reformer-enwik8``,
  vocabulary 258): token id = byte value + 2 over the UTF-8 bytes of the text; ids 0 and 1 are
  reserved (0 is the padding id) and decode to nothing. HF's model card decodes with
  ``chr(id - 2)`` (each byte as a Latin-1 character); here the bytes are decoded as UTF-8
  (enwik8 is UTF-8 text), incrementally, so a character split over several tokens appears once
  it is complete (invalid sequences become U+FFFD).
* :class:`SentencePieceTokenizer`: ``transformers.ReformerTokenizer`` loaded from a folder
  (``spiece.model`` or ``tokenizer.json``), as the Crime-and-Punishment model ships it.
"""

from __future__ import annotations

import codecs
import os
import pathlib

__all__ = ["ByteTokenizer", "SentencePieceTokenizer", "TOKENIZER_FILES", "has_tokenizer_files"]

#: files that mark a folder as holding a (sentencepiece) tokenizer
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json")


def has_tokenizer_files(folder) -> bool:
    folder = pathlib.Path(folder)
    return folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES)


class ByteTokenizer:
    """UTF-8 bytes, id = byte + 2 (ids 0 and 1 reserved); needs ``vocab_size >= 258`` for any byte."""

    name = "bytes"
    offset = 2

    def encode(self, text: str) -> list[int]:
        return [byte + self.offset for byte in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - self.offset for i in ids if self.offset <= i < 256 + self.offset).decode("utf-8", "replace")

    def stream(self):
        """A function ``piece(id) -> str`` returning the text each new id completes."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def piece(token: int) -> str:
            if not self.offset <= token < 256 + self.offset:
                return ""  # reserved ids (and ids past the bytes) are no text
            return decoder.decode(bytes([token - self.offset]))

        return piece


class SentencePieceTokenizer:
    """``transformers.ReformerTokenizer`` from a folder (no special tokens added)."""

    name = "sentencepiece"

    def __init__(self, folder) -> None:
        try:
            import transformers
        except ImportError:
            raise ImportError(f"{folder} holds a sentencepiece tokenizer, read with transformers' ReformerTokenizer: "
                              f"install transformers (pip install transformers), or use the byte-level tokenizer "
                              f"(--tokenizer bytes)") from None
        transformers.logging.set_verbosity_error()
        self.tokenizer = transformers.ReformerTokenizer.from_pretrained(os.fspath(folder))
        self.vocab_size = len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def stream(self):
        """``piece(id) -> str``: decodes everything so far and returns what is new (pieces carry
        their leading spaces, so decoding one id alone would lose them)."""
        ids: list[int] = []
        shown = [""]

        def piece(token: int) -> str:
            ids.append(int(token))
            text = self.decode(ids)
            if text.startswith(shown[0]):
                new, shown[0] = text[len(shown[0]):], text
                return new
            return ""  # a later piece changed earlier text (rare): wait until it is stable again

        return piece
