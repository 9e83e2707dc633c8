"""The safetensors header read with plain file reads: tensor names, shapes and metadata without mapping the file."""

from __future__ import annotations

import json
import struct

MAX_HEADER_BYTES = 100 << 20  # CLIP checkpoints carry headers of a few hundred KB; anything near this is not one


def read_header(handle) -> tuple[dict, int]:
    """(header, its size in bytes) from a binary file positioned at its start; ValueError when malformed."""
    raw = handle.read(8)
    if len(raw) != 8:
        raise ValueError("file too short for a safetensors header")
    (size,) = struct.unpack("<Q", raw)
    if size > MAX_HEADER_BYTES:
        raise ValueError(f"header of {size} bytes is implausible")
    header = json.loads(handle.read(size))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, size
