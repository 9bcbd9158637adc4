"""Checkpoint text entries: the format marker, the config and the metadata, and the shared bounds.

Both checkpoint formats store the same text beside the arrays (in ``.npz`` as uint8 entries,
in ``.safetensors`` in the header): the marker ``"reformer-core-checkpoint/1"``, the config as
JSON of ``config.to_dict()`` and the user's metadata as JSON. This module writes and reads
them (:func:`metadata_json`, :func:`text_entry`, :func:`json_entry`, :func:`stored_config`,
:func:`check_marker`), holds the size bounds both formats check before reading any data (the
text entries, the optimizer state), and the error messages they share.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .._config import ReformerConfig
from .checkpoint_keys import CONFIG_KEY

FORMAT_NAME = "reformer-core-checkpoint"
FORMAT_VERSION = 1

# Bounds on what a file may declare before its data is read. The text entries have no size in
# the config: 16 MiB each (save_checkpoint refuses larger metadata). An optimizer-state leaf may
# hold at most as many bytes as all parameters at 16 bytes per element, and all of them together
# 8 times that. (Parameters must have exactly the config's shapes.)
MAX_TEXT_BYTES = 16 * 2**20
OPTIMIZER_LEAF_BYTES_PER_PARAM = 16
OPTIMIZER_TOTAL_FACTOR = 8


def metadata_json(metadata: Any) -> str:
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict of JSON data, got {type(metadata).__name__}")
    try:
        text = json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"metadata must be JSON data (dicts, lists, str, finite numbers, bool, None): {error}"
        ) from None
    if len(text.encode("utf-8")) > MAX_TEXT_BYTES:
        raise ValueError(
            f"metadata takes {len(text.encode('utf-8'))} bytes as JSON, more than the {MAX_TEXT_BYTES} a checkpoint "
            f"stores (load_checkpoint refuses larger text entries); keep large data in optimizer_state arrays"
        )
    if json.loads(text) != metadata:
        raise TypeError(
            "metadata does not survive JSON unchanged (tuples become lists, non-str keys become str); "
            "use lists and str keys"
        )
    return text


def text_array(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def check_marker(name: str, marker: str) -> None:
    format_name, _, version = marker.rpartition("/")
    if format_name != FORMAT_NAME or not version.isdigit():
        raise ValueError(
            f"checkpoint {name} has unknown format {marker!r}; expected '{FORMAT_NAME}/{FORMAT_VERSION}'"
        )
    if int(version) != FORMAT_VERSION:
        newer = int(version) > FORMAT_VERSION
        raise ValueError(
            f"checkpoint {name} has format version {version}, this reformer-core reads version {FORMAT_VERSION}"
            + ("; upgrade reformer-core to read it" if newer else "")
        )


def unreadable(name: str, why: str) -> ValueError:
    return ValueError(
        f"{name} is not a readable reformer-core checkpoint ({why}); "
        f"it may be truncated, corrupted, or not a file written by save_checkpoint"
    )


def text_entry(name: str, arrays: dict, key: str) -> str:
    if key not in arrays:
        raise ValueError(f"checkpoint {name} has no {key} entry; it was not written by save_checkpoint")
    entry = arrays[key]
    if entry.dtype != np.uint8 or entry.ndim != 1:
        raise ValueError(
            f"checkpoint {name}: {key} must be a 1-d uint8 array of UTF-8 text, got {entry.dtype} {entry.shape}"
        )
    try:
        return entry.tobytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"checkpoint {name}: {key} is not UTF-8 text") from None


def json_entry(name: str, arrays: dict, key: str) -> Any:
    text = text_entry(name, arrays, key)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"checkpoint {name}: {key} is not valid JSON ({error})") from None


def stored_config(name: str, arrays: dict) -> ReformerConfig:
    data = json_entry(name, arrays, CONFIG_KEY)
    if not isinstance(data, dict):
        raise ValueError(f"checkpoint {name}: {CONFIG_KEY} is not a JSON object")
    try:
        return ReformerConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint {name} holds an invalid config: {error}") from None


def config_difference(name: str, stored: ReformerConfig, given: ReformerConfig) -> str:
    stored_dict, given_dict = stored.to_dict(), given.to_dict()
    fields = [f for f in stored_dict if stored_dict[f] != given_dict[f]]
    listing = "; ".join(f"{f}: file has {stored_dict[f]!r}, given {given_dict[f]!r}" for f in fields)
    return (
        f"checkpoint {name} was saved with a different config ({listing}); "
        f"pass config=None to use the stored one"
    )


def listing(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)} in all)"
