"""The safetensors format, read and written without the ``safetensors`` package.

An 8-byte little-endian header length, a JSON header (every tensor's dtype, shape and byte
range, and an optional ``__metadata__`` of strings), then raw little-endian data. The reader
checks the whole header (dtypes, shapes, ranges inside the file, no overlaps) before it
reads any data, so a lying header costs nothing; bfloat16 travels as its raw 16-bit pattern.
Used by HF folders (``hf.py``) and ``.safetensors`` checkpoints (``checkpoint.py``).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import uuid

import numpy as np

__all__ = ["read_safetensors", "read_safetensors_header", "write_safetensors", "write_safetensors_to"]


_ST_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
              "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
              "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
_MAX_HEADER = 100 * 2**20


def read_safetensors_header(path) -> tuple[dict, dict, int]:
    """``(entries, metadata, data_start)`` of a ``.safetensors`` file, reading only its header.

    ``entries[name] = (dtype_tag, shape, begin, end)`` (byte offsets into the data section,
    which starts at ``data_start``). Every entry is validated here, before any data is read:
    a known dtype, a shape of non-negative ints, a byte range inside the file that holds
    exactly ``prod(shape) * itemsize`` bytes, and no two ranges overlapping; the header length
    itself must fit the file and 100 MiB. ``metadata`` (``__metadata__``) must map str to str.
    Anything else raises ValueError naming the file.
    """
    path = pathlib.Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file: {size} bytes, shorter than its 8-byte header length")
        header_length = int.from_bytes(head, "little")
        if header_length > min(size - 8, _MAX_HEADER):
            raise ValueError(f"{path} is not a safetensors file (or is truncated): header length {header_length} "
                             f"exceeds the file's {size - 8} remaining bytes"
                             + (f" or the {_MAX_HEADER} bytes a header may take" if header_length > _MAX_HEADER
                                else ""))
        try:
            header = json.loads(f.read(header_length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or any(not isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: its __metadata__ must map names to strings")
    data_start, data_size = 8 + header_length, size - 8 - header_length
    entries = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: header entry {name!r} is malformed: {entry!r}") from None
        if dtype not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype!r}, which reformer-core does not read")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape) or not (
                isinstance(begin, int) and isinstance(end, int) and not isinstance(begin, bool)
                and not isinstance(end, bool) and 0 <= begin <= end <= data_size):
            raise ValueError(f"{path}: tensor {name!r} has an invalid shape {shape} or byte range [{begin}, {end}) "
                             f"(data holds {data_size} bytes; the file is truncated, damaged or crafted)")
        if end - begin != math.prod(shape) * _ST_DTYPES[dtype].itemsize:
            raise ValueError(f"{path}: tensor {name!r} of dtype {dtype} and shape {shape} needs "
                             f"{math.prod(shape) * _ST_DTYPES[dtype].itemsize} bytes, its range holds {end - begin}")
        entries[name] = (dtype, shape, begin, end)
    ranges = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items() if end > begin)
    for (_, first_end, first), (second_begin, _, second) in zip(ranges, ranges[1:]):
        if second_begin < first_end:
            raise ValueError(f"{path}: tensors {first!r} and {second!r} have overlapping byte ranges; the file is "
                             f"damaged or crafted")
    return entries, metadata, data_start


def read_safetensors(path, *, expected: dict | None = None, validate=None) -> tuple[dict, dict, dict]:
    """``(arrays, dtypes, metadata)`` of a ``.safetensors`` file, parsed without the package.

    The header is validated first (:func:`read_safetensors_header`): every entry's dtype,
    shape and byte range must be consistent, inside the file and not overlapping; when
    ``expected`` (name -> shape) is given, each named entry's shape must match; and
    ``validate(entries, metadata)``, when given, may raise for anything else -- all before any
    data is read (then entry by entry). bfloat16 entries come back as exact float32 with
    ``dtypes[name] == "bfloat16"``.
    """
    path = pathlib.Path(path)
    entries, metadata, data_start = read_safetensors_header(path)
    for name, (dtype, shape, _, _) in entries.items():
        if expected is not None and name in expected and shape != tuple(expected[name]):
            raise ValueError(f"{path}: weight {name} has shape {shape}, but config.json implies "
                             f"{tuple(expected[name])}")
    if validate is not None:
        validate(entries, metadata)
    arrays, dtypes = {}, {}
    with open(path, "rb") as f:
        for name, (dtype, shape, begin, _) in entries.items():
            f.seek(data_start + begin)
            raw = np.fromfile(f, dtype=_ST_DTYPES[dtype], count=math.prod(shape))
            if raw.size != math.prod(shape):
                raise ValueError(f"{path}: tensor {name!r} is truncated (the file changed while it was read)")
            raw = raw.reshape(shape)
            if dtype == "BF16":
                raw = (raw.astype(np.uint32) << 16).view(np.float32)
                dtypes[name] = "bfloat16"
            else:
                raw = raw.astype(raw.dtype.newbyteorder("="), copy=False)
                dtypes[name] = raw.dtype.name
            arrays[name] = raw
    return arrays, dtypes, metadata


_WRITE_TAGS = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64",
               np.dtype("<i4"): "I32", np.dtype("<i2"): "I16", np.dtype("i1"): "I8", np.dtype("u1"): "U8",
               np.dtype("?"): "BOOL"}


def write_safetensors_to(file, arrays: dict, *, dtypes: dict | None = None, metadata: dict | None = None) -> None:
    """Write host arrays in the safetensors format to an open binary ``file`` (see
    :func:`write_safetensors`)."""
    header, blobs, offset = {}, [], 0
    for name in sorted(arrays):
        array = np.asarray(arrays[name], order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        if (dtypes or {}).get(name) == "bfloat16":
            bits = np.asarray(array, dtype="<f4").view("<u4")
            if np.any(bits & 0xFFFF):
                raise ValueError(f"tensor {name!r} holds values that are not bfloat16 numbers; cast it first")
            data, tag = (bits >> 16).astype("<u2").tobytes(), "BF16"
        else:
            little = array.astype(array.dtype.newbyteorder("<"), copy=False) if array.dtype.itemsize > 1 else array
            if little.dtype not in _WRITE_TAGS:
                raise TypeError(f"tensor {name!r} has dtype {array.dtype}, which is not written here")
            data, tag = little.tobytes(), _WRITE_TAGS[little.dtype]
        header[name] = {"dtype": tag, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format allows trailing spaces; keeps the data 8-byte aligned
    file.write(len(text).to_bytes(8, "little"))
    file.write(text)
    for blob in blobs:
        file.write(blob)


def write_safetensors(path, arrays: dict, *, dtypes: dict | None = None, metadata: dict | None = None) -> None:
    """Write host arrays as a ``.safetensors`` file (atomically: a temporary file, then rename).

    ``dtypes[name] == "bfloat16"`` stores a float32 array as bfloat16; its values must be
    exact bfloat16 numbers (ValueError otherwise: nothing is rounded silently).
    """
    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as f:
            write_safetensors_to(f, arrays, dtypes=dtypes, metadata=metadata)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
