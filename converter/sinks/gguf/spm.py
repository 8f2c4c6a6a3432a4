"""A SentencePiece ``tokenizer.model`` read with the ``sentencepiece`` library.

llama.cpp's converter reads the pieces through ``SentencePieceProcessor`` (text, score,
and the unknown / control / unused / byte flags; every other piece is normal); reading
them the same way gives the same vocabulary, and a file sentencepiece cannot load is
refused instead of half-read.
"""

from __future__ import annotations

from pathlib import Path

#: sentencepiece's piece types, the same numbering as ``gguf.TokenType``
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def read_sentencepiece_model(path: Path) -> list[tuple[str, float, int]]:
    """``[(piece, score, type)]`` of a SentencePiece model, typed as llama.cpp's converter types them."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))  # OSError / RuntimeError for a file that is not a model
    pieces: list[tuple[str, float, int]] = []
    for i in range(sp.vocab_size()):
        typ = NORMAL
        if sp.IsUnknown(i):
            typ = UNKNOWN
        elif sp.IsControl(i):
            typ = CONTROL
        elif sp.IsUnused(i):
            typ = UNUSED
        elif sp.IsByte(i):
            typ = BYTE
        pieces.append((sp.IdToPiece(i), float(sp.GetScore(i)), typ))
    if not pieces:
        raise ValueError("no pieces found")
    return pieces
