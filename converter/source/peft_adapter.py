"""PEFT adapter folders (docs/run-format.md §5): the adapter, its base model, both as sources.

A PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) is a
``dense_lora`` checkpoint whose frozen weights live in a separate base model. This module
finds that base (``--base-model``, the run's ``model.name_or_path``, then the adapter's
``base_model_name_or_path``), as a local folder or a Hub id already in the local Hugging
Face cache: nothing is downloaded unless the caller asks for it. Which options can be
merged, and how, is the strategy's business (:mod:`converter.strategy.peft_rules`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..errors import fail
from ..hf_model import check_config
from ..fetch import download_snapshot
from .files import read_json, typed
from .run_dir import RESOLVED, AdapterBase, ResolvedRun, backbone_of, model_info, where
from .safetensors import TensorInfo, TensorSource

SEE_ADAPTERS = "docs: README.md#peft-adapters"
# How a user asks efexport to fetch a base model that is not available locally.
DOWNLOAD_OPTION = "--download-base (download_base=True in the API)"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
BASE_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def read_adapter_config(ckpt_dir: Path) -> dict[str, Any]:
    return read_json(Path(ckpt_dir) / "adapter_config.json", SEE_ADAPTERS)


# --------------------------------------------------------------------------- finding the base model


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?", name)) and ".." not in name


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local snapshot folder of a Hub model already in the HF cache (no network access)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    try:
        hit = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # invalid repo id, unreadable cache: simply not available
        hit = None
    return Path(hit).parent if isinstance(hit, str) and Path(hit).is_file() else None


def _has_weights(folder: Path) -> bool:
    return any((folder / f).is_file() for f in (
        "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"))


def find_base(candidates: list[tuple[str, str, str | None]], *, download_base: bool = False) -> tuple[str, Path]:
    """First available base among (origin, name_or_path, revision); ``--base-model`` must be available itself."""
    tried: list[str] = []
    for origin, name, revision in candidates:
        local = Path(name).expanduser()
        if local.is_dir():
            if not (local / "config.json").is_file() or not _has_weights(local):
                raise fail(
                    f"use base model folder {name} ({origin}): it has no config.json and model weights",
                    "pass --base-model with a Hugging Face model folder (config.json + model.safetensors).",
                    SEE_ADAPTERS,
                )
            return name, local.resolve()
        snapshot = _cached_snapshot(name, revision) if _looks_like_hub_id(name) else None
        if snapshot is not None and _has_weights(snapshot):
            return name, snapshot
        if download_base and _looks_like_hub_id(name):
            return name, download_snapshot(name, revision=revision, allow_patterns=BASE_FILES,
                                           what="download base model", see=SEE_ADAPTERS)
        tried.append(f"{name!r} ({origin})")
        if origin == "--base-model":
            break
    if not tried:
        raise fail(
            "find the adapter's base model: adapter_config.json has no base_model_name_or_path and none was given",
            f"pass --base-model PATH_OR_ID (a local model folder, or a Hub id in the local cache; {DOWNLOAD_OPTION} "
            "fetches it).",
            SEE_ADAPTERS,
        )
    raise fail(
        f"find the adapter's base model: {', '.join(tried)} {'is' if len(tried) == 1 else 'are'} neither a local "
        "model folder nor a model in the local Hugging Face cache (efexport downloads nothing unless asked)",
        f"pass --base-model PATH_OR_ID with a local copy, or add {DOWNLOAD_OPTION} to fetch it from the Hub.",
        SEE_ADAPTERS,
    )


# --------------------------------------------------------------------------- resolution


def resolve_adapter(ckpt_dir: Path, path_type: str, run_dir: Path | None, checkpoint: str | None,
                    resolved_cfg: dict[str, Any], base_model: str | None, *,
                    download_base: bool = False) -> ResolvedRun:
    """Describe a PEFT adapter checkpoint: its options (checked), its base model, the merged config."""
    ckpt_dir = Path(ckpt_dir)
    cfg = read_adapter_config(ckpt_dir)
    if not any((ckpt_dir / f).is_file() for f in ADAPTER_WEIGHTS):
        raise fail(
            f"read the PEFT adapter in {ckpt_dir.name}: adapter_config.json is there "
            "but adapter_model.safetensors is not",
            "copy the adapter's weights (adapter_model.safetensors) next to its adapter_config.json.",
            SEE_ADAPTERS,
        )
    candidates: list[tuple[str, str, str | None]] = []
    if base_model:
        candidates.append(("--base-model", str(base_model), None))
    else:
        run_base = model_info(resolved_cfg).get("name_or_path")
        if run_base:
            candidates.append(("resolved_config.json model.name_or_path", str(run_base), None))
        named = typed(cfg, "base_model_name_or_path", str, "adapter_config.json", "a model id or path", SEE_ADAPTERS)
        if named:  # PEFT loads it at the adapter_config's "revision"
            candidates.append(("adapter_config.json base_model_name_or_path", named,
                               typed(cfg, "revision", str, "adapter_config.json", "a revision name", SEE_ADAPTERS)
                               or None))
    named, base_dir = find_base(candidates, download_base=download_base)

    base_config = read_json(base_dir / "config.json", SEE_ADAPTERS)
    base_config.pop("eulerforge", None)
    check_config(base_config, base_dir / "config.json", SEE_ADAPTERS)
    if base_config.get("quantization_config"):
        quant = base_config["quantization_config"]
        method = str(quant.get("quant_method", "quantized") if isinstance(quant, dict) else "quantized")[:40]
        raise fail(
            f"merge the adapter into base model {named}: its weights are {method}-quantized (QLoRA-style base), "
            "and a merge into quantized weights is not exact",
            "pass --base-model with the original, unquantized model the quantized base was made from.",
            SEE_ADAPTERS,
        )
    return ResolvedRun(
        **where(ckpt_dir, path_type, run_dir, checkpoint, resolved_cfg),
        hf_config=base_config,  # the merge planner adds what the adapter changes (untied embeddings)
        block=None,
        backbone=backbone_of(typed(resolved_cfg, "backbone", str, RESOLVED, "a backbone name") or "",
                             str(base_config.get("model_type", ""))),
        base_model=named,
        source_kind="peft_adapter",
        adapter=AdapterBase(base_dir=base_dir, adapter_config=cfg, base_config=base_config),
    )


class AdapterSource:
    """Base model + adapter as one source: infos/names/files/nbytes/close, as the pipeline uses them."""

    def __init__(self, base: TensorSource, adapter: TensorSource) -> None:
        self.base, self.adapter = base, adapter
        self.infos: dict[str, TensorInfo] = {**base.infos, **adapter.infos}
        self.files = [*base.files, *adapter.files]

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def _of(self, name: str) -> TensorSource:
        return self.adapter if name in self.adapter.infos else self.base

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.infos[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._of(name).get(name)

    def nbytes(self) -> int:
        return self.base.nbytes() + self.adapter.nbytes()

    def close(self) -> None:
        self.base.close()
        self.adapter.close()

    def __enter__(self) -> "AdapterSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
