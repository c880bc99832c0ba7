"""One JSON object per line between the test process and its ranks;
arrays travel as base64 .npy bytes."""

from __future__ import annotations

import base64
import io
import json

import numpy as np

PREFIX = "@dsv4shard "  # marks protocol lines among anything else a rank prints


def encode_array(a: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(a), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_array(text: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)


def dumps(message: dict) -> str:
    return PREFIX + json.dumps(message) + "\n"


def loads(line: str) -> dict | None:
    """The message on a protocol line, or None for any other line."""
    if not line.startswith(PREFIX):
        return None
    return json.loads(line[len(PREFIX):])
