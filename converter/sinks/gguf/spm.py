"""A SentencePiece ``tokenizer.model`` read without sentencepiece or protobuf installed.

The GGUF vocabulary of a SentencePiece tokenizer needs only the pieces (text, score,
type) and the normaliser's ``add_dummy_prefix``; a few lines of protobuf wire-format
decoding give both, so the ``efexport[gguf]`` extra needs no tokenizer library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

#: sentencepiece's piece types, the same numbering as ``gguf.TokenType``
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of one protobuf message."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        fno, wt = key >> 3, key & 7
        v: int | bytes
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 2:
            ln, i = _varint(buf, i)
            v, i = buf[i:i + ln], i + ln
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        yield fno, wt, v


def read_sentencepiece_model(path: Path) -> tuple[list[tuple[str, float, int]], bool | None]:
    """Minimal protobuf reader for sentencepiece ``ModelProto``: pieces and add_dummy_prefix.

    Returns ``([(piece, score, type)], add_dummy_prefix)``; types follow
    sentencepiece (1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte).
    """
    data = Path(path).read_bytes()
    pieces: list[tuple[str, float, int]] = []
    add_dummy_prefix: bool | None = None
    for fno, wt, v in _fields(data):
        if fno == 1 and wt == 2:
            piece, score, typ = "", 0.0, NORMAL
            for f2, w2, v2 in _fields(v):  # type: ignore[arg-type]
                if f2 == 1 and w2 == 2:
                    piece = v2.decode("utf-8")  # type: ignore[union-attr]
                elif f2 == 2 and w2 == 5:
                    score = float(np.frombuffer(v2, dtype="<f4")[0])  # type: ignore[arg-type]
                elif f2 == 3 and w2 == 0:
                    typ = int(v2)  # type: ignore[arg-type]
            pieces.append((piece, score, typ))
        elif fno == 3 and wt == 2:  # normalizer_spec
            for f2, w2, v2 in _fields(v):  # type: ignore[arg-type]
                if f2 == 3 and w2 == 0:
                    add_dummy_prefix = bool(v2)
    if not pieces:
        raise ValueError("no pieces found")
    return pieces, add_dummy_prefix
