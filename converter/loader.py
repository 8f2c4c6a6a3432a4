"""``load_model()``: seed 000's API, as the in-memory sink of the pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import fail
from .precision import FLOAT_DTYPES, check_precision, require_bitsandbytes

SEE = "docs: README.md#loading-a-run"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelMetadata:
    """What was loaded: the seed's fields."""

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
    """The seed's dtype argument combined with load_precision: an fp precision wins."""
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


def load_model(
    path: str | Path,
    *,
    checkpoint: str | int = "final",
    device: str = "auto",
    dtype: str = "auto",
    load_precision: str | None = None,
    base_model: str | None = None,
    download_base: bool = False,
) -> "LoadedModel":
    """Load an EulerForge run (or checkpoint, PEFT adapter, HF folder) in one line.

    The strategy is detected and cross-checked; dense_lora is merged, moe_expert_lora and
    mixture_lora keep their structure. PEFT adapter folders take their base from ``base_model``
    (or their config); ``download_base=True`` lets a missing Hub base be downloaded. int4 is bitsandbytes NF4 + double quant with
    bfloat16 compute, int8 is LLM.int8, both on CPU or CUDA.
    """
    from .model_sink import build_model
    from .pipeline import open_pipeline

    precision = check_precision(load_precision)
    dev = resolve_device(device)
    float_dtype = resolve_float_dtype(dtype, precision)
    require_bitsandbytes(precision)
    with open_pipeline(path, checkpoint, for_loading=True, base_model=base_model, download_base=download_base) as pipe:
        quantized = pipe.quantizable if precision in ("int4", "int8") else set()
        plan = pipe.planned(precision, float_dtype)
        model = build_model(pipe.target.hf_config, pipe.target.structure, plan, precision, quantized)
        tokenizer = load_tokenizer(pipe.tokenizer_dir())
        run, inj, target = pipe.run, pipe.injection, pipe.target
    model = model.to(dev)
    meta = ModelMetadata(
        strategy=inj.strategy,
        backbone=run.backbone,
        path_type=run.path_type,
        checkpoint_dir=str(run.checkpoint_dir),
        lora_config=inj.lora_config,
        structure_preserved=target.structure_preserved,
        load_precision=precision,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, metadata=meta)
