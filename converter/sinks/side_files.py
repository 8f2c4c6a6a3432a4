"""Files an artifact carries beside its weights: the tokenizer, generation_config.json.

Every format sink copies the same set, and none writes a local path into an artifact.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "added_tokens.json")


def copy_side_files(tokenizer_dir: Path | None, config_dirs: list[Path | None], dest: Path) -> None:
    """Tokenizer files from ``tokenizer_dir``; generation_config.json from the first of ``config_dirs`` that has one."""
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, dest / name)
    for d in config_dirs:
        if d is not None and (Path(d) / "generation_config.json").is_file():
            shutil.copy2(Path(d) / "generation_config.json", dest / "generation_config.json")
            break


def public_base_model(base: str | None) -> str | None:
    """Hub ids are kept; a local path is never written into an artifact."""
    if not base:
        return None
    return None if os.path.isabs(base) or base.startswith(("~", ".")) else base
