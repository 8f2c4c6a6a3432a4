"""Resized vocabularies: how many tokens a tokenizer holds, and whether that explains an embedding's rows.

A fine-tune that adds tokens resizes the embedding (``model.resize_token_embeddings(
len(tokenizer))``, optionally with ``pad_to_multiple_of``) and saves the enlarged
tokenizer next to its weights. A checkpoint or adapter whose embedding rows differ
from its config's (or its base's) ``vocab_size`` is accepted as resized only when that
tokenizer accounts for the rows exactly; anything else is the three-line error naming
both sizes and what was found. Only JSON and safetensors headers are read here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import fail

# pad_to_multiple_of values a resize may have used (transformers rounds len(tokenizer) up to one of them).
PAD_MULTIPLES = (8, 16, 32, 64, 128, 256, 512, 1024)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# Embedding and head weights of the architectures efexport reads, as a checkpoint names them.
EMBEDDING_NAMES = ("model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight")


def tokenizer_dir(candidates: list[Path | None]) -> Path | None:
    """The first folder with tokenizer files: the tokenizer an export writes (docs/run-format.md §1)."""
    for d in candidates:
        if d is not None and any((Path(d) / f).is_file() for f in TOKENIZER_MARKERS):
            return Path(d)
    return None


def tokenizer_length(folder: Path) -> int | None:
    """``len(tokenizer)`` of a tokenizer folder: its vocabulary plus added tokens (None if unreadable)."""
    tj = Path(folder) / "tokenizer.json"
    try:
        if tj.is_file():  # what transformers' len() of a fast tokenizer returns
            from tokenizers import Tokenizer

            return int(Tokenizer.from_file(str(tj)).get_vocab_size(with_added_tokens=True))
        from transformers import AutoTokenizer  # a SentencePiece-only folder: ask transformers

        return len(AutoTokenizer.from_pretrained(str(folder)))
    except Exception:  # a damaged tokenizer is reported where it is loaded; here it explains nothing
        return None


def pad_explains(rows: int, tokens: int) -> bool:
    """``rows`` is ``len(tokenizer)``, or it rounded up with a ``pad_to_multiple_of`` transformers users pass."""
    return rows == tokens or any(rows == -(-tokens // m) * m for m in PAD_MULTIPLES if rows > tokens)


def check_resize(rows: int, old_rows: int, what: str, where: str, tok: Path | None, see: str, *,
                 action: str = "resize the vocabulary", beside: str = "next to the checkpoint",
                 tokens: int | None = None) -> None:
    """Accept ``rows`` != ``old_rows`` when the tokenizer in ``tok`` explains it; else the three-line error.

    ``what``: the tensor that has ``rows`` rows; ``where``: what has ``old_rows`` (the base, config.json);
    ``tokens``: the tokenizer's length when already known.
    """
    if tokens is None and tok is not None:
        tokens = tokenizer_length(tok)
    if tokens is not None and pad_explains(rows, tokens):
        return
    found = (f"a tokenizer of {tokens} tokens in {tok.name}/" if tokens is not None and tok is not None
             else f"no readable tokenizer in {tok.name}/" if tok is not None else "no tokenizer")
    raise fail(
        f"{action}: {what} has {rows} rows but {where} has {old_rows}, and {found} does not explain {rows} rows "
        "(len(tokenizer), or rounded up by pad_to_multiple_of)",
        f"found a vocabulary resized to {rows} rows and {found}: save the tokenizer the model was trained with "
        f"(tokenizer.save_pretrained) {beside}.",
        see,
    )


def embedding_rows(ckpt_dir: Path) -> dict[str, int]:
    """Rows of the embedding / head weights in a checkpoint's safetensors headers ({} for legacy .bin)."""
    from .safetensors import read_safetensors_header

    ckpt_dir = Path(ckpt_dir)
    files: list[Path] = []
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map: Any = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
            files = sorted({ckpt_dir / str(weight_map[n]) for n in EMBEDDING_NAMES if n in weight_map})
        except (ValueError, OSError, AttributeError):
            return {}  # reported by the weights reader
    elif (ckpt_dir / "model.safetensors").is_file():
        files = [ckpt_dir / "model.safetensors"]
    rows: dict[str, int] = {}
    for f in files:
        if not f.is_file():
            continue
        for name, info in read_safetensors_header(f).items():
            if name in EMBEDDING_NAMES and len(info.shape) == 2:
                rows[name] = int(info.shape[0])
    return rows


def resized_config(hf_config: dict[str, Any], ckpt_dir: Path, tok: Path | None,
                   see: str) -> tuple[dict[str, Any], dict[str, int] | None]:
    """A checkpoint whose embedding has other rows than config.json's ``vocab_size``.

    EulerForge may save the backbone's own config.json next to an embedding resized for
    added tokens: when the run's tokenizer is larger than that vocab_size and explains the
    rows, the config takes the new size. A tokenizer no larger than the config's vocabulary
    is no resize (the weights' shape check names the mismatch). Returns (config,
    {"base_size", "size"} or None).
    """
    size = hf_config.get("vocab_size")
    if not isinstance(size, int) or isinstance(size, bool):
        return hf_config, None
    rows = embedding_rows(ckpt_dir)
    if not rows or all(r == size for r in rows.values()):
        return hf_config, None
    tokens = tokenizer_length(tok) if tok is not None else None
    if tokens is None or tokens <= size:
        return hf_config, None
    if len(set(rows.values())) > 1:
        detail = ", ".join(f"{n} {r}" for n, r in rows.items())
        raise fail(f"resize the vocabulary of {ckpt_dir.name}: its embedding and head disagree on the rows ({detail})",
                   "re-save the checkpoint after model.resize_token_embeddings(len(tokenizer)).", see)
    name, new = next(iter(rows.items()))
    check_resize(new, size, f"{ckpt_dir.name}'s {name}", "config.json's vocab_size", tok, see, tokens=tokens)
    return {**hf_config, "vocab_size": new}, {"base_size": size, "size": new}
