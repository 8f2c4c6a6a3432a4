"""What both loaders return, and the argument checks they share (device, dtype, tokenizer).

Kept apart from :mod:`converter.loader` so the runtime loader can use it without reaching
run resolution or adapter planning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import fail
from .precision import FLOAT_DTYPES

SEE = "docs: README.md#loading-a-run"
DTYPES = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES.values()}  # "float32" -> torch.float32


@dataclass
class ModelMetadata:
    """What was loaded: strategy, backbone, where from, and how it was built."""

    strategy: str
    backbone: str
    path_type: str
    checkpoint_dir: str
    lora_config: dict[str, Any] | None
    structure_preserved: bool
    load_precision: str | None


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    metadata: ModelMetadata


def resolve_device(device: str) -> torch.device:
    """auto -> cuda when present, else cpu; an absent CUDA is a clear error, not a crash later."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise fail(f"use device {device!r}: not a device name", 'pass device="auto", "cpu", "cuda" or "cuda:N".', SEE) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise fail(
                f"use device {device!r}: CUDA is not available on this machine",
                'pass device="cpu" (or "auto"), or install a CUDA build of PyTorch on a GPU machine.',
                SEE,
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise fail(f"use device {device!r}: only {torch.cuda.device_count()} GPU(s) here",
                       "pick an existing GPU index.", SEE)
    elif dev.type != "cpu":
        raise fail(f"use device {device!r}: only cpu and cuda are supported", 'pass device="auto", "cpu" or "cuda".', SEE)
    return dev


def resolve_float_dtype(dtype: str, precision: str | None) -> torch.dtype | None:
    """The dtype argument combined with load_precision: an fp precision wins."""
    if dtype not in ("auto", *DTYPES):
        raise fail(f"use dtype {dtype!r}", 'pass dtype="auto", "float32" or "bfloat16".', SEE)
    if precision in FLOAT_DTYPES:
        return FLOAT_DTYPES[precision]
    return None if dtype == "auto" else DTYPES[dtype]


def load_tokenizer(directory: Path | None) -> Any:
    if directory is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))
