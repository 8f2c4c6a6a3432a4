"""The tokenizer folder of one export, each small file parsed once and passed along.

The vocabulary, its special tokens and the Ollama Modelfile all read
``tokenizer_config.json``; :class:`TokenizerFiles` parses it on first use and keeps
it. ``tokenizer.json`` (megabytes for real vocabularies) is parsed where it is
needed and not kept, so it never sits in memory while tensors stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path


@dataclass
class TokenizerFiles:
    """A checkpoint's tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json, ...)."""

    path: Path

    def file(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def read_json(self, name: str) -> dict | None:
        """A JSON file of the folder, parsed now (None when absent)."""
        if not self.has(name):
            return None
        with open(self.path / name, encoding="utf-8") as f:
            return json.load(f)

    def tokenizer_json(self) -> dict | None:
        return self.read_json("tokenizer.json")

    @cached_property
    def config(self) -> dict:
        """``tokenizer_config.json`` ({} when absent), parsed once per export."""
        return self.read_json("tokenizer_config.json") or {}


def tokenizer_files(tokenizer: Path | str | TokenizerFiles) -> TokenizerFiles:
    """Accept a folder or an already opened :class:`TokenizerFiles` (which keeps its parsed files)."""
    return tokenizer if isinstance(tokenizer, TokenizerFiles) else TokenizerFiles(Path(tokenizer))
