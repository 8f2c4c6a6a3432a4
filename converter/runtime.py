"""Runtime loader for efexport artifacts: ``load_artifact(DIR)``.

Import-light on purpose: torch, safetensors and transformers only; bitsandbytes only
when the artifact is quantized; huggingface_hub only when given a Hub repo id. It never
imports click, jinja2 or peft, so it can ship inside a serving image as it is.

Every file is checked against efexport.json (size and sha256): small files before
anything is used, weight files while they are read (no model is returned unverified). ``dense`` and ``moe`` layouts load through ``AutoModelForCausalLM``;
``compact`` layouts are built from efexport's own module code (never
``trust_remote_code``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import fail
from .loaded import LoadedModel, ModelMetadata, load_tokenizer, resolve_device, resolve_float_dtype
from .manifest import read_manifest, verified_while_read
from .quiet import quiet_libraries

SEE = "docs: README.md#loading-an-artifact"
HF_LAYOUTS = ("dense", "moe", "compact")


def _local_folder(path: str | Path, revision: str | None, token: str | None, endpoint: str | None) -> Path:
    """A local folder as is; 'owner/name' that is not a folder is fetched from the Hub."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p.resolve()
    text = str(path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        from .fetch import download_artifact  # imports huggingface_hub, only here

        # Names and sizes are checked there (a downloaded manifest is untrusted); the hashes, once, below.
        return download_artifact(text, revision=revision, token=token, endpoint=endpoint)
    raise fail(f"load artifact {path}: no such folder", "pass the --out folder of an efexport export, or a Hub repo id.", SEE)


def quantized_modules(source: Any) -> tuple[str | None, set[str]]:
    """Which Linears of a compact artifact hold bitsandbytes tensors, and how."""
    nf4 = {n[: -len(".quant_state.bitsandbytes__nf4")] for n in source.names if n.endswith(".quant_state.bitsandbytes__nf4")}
    if nf4:
        return "int4", nf4
    int8 = {n[: -len("SCB")] + "weight" for n in source.names if n.endswith(".SCB")}
    return ("int8", int8) if int8 else (None, set())


def _load_compact(folder: Path, config: dict[str, Any], float_dtype: torch.dtype | None) -> torch.nn.Module:
    """Rebuild the run's structure from converter.modules and stream the tensors in."""
    from .modules import STRUCTURE_KEY
    from .plan import PlannedTensor
    from .sinks.model import build_model
    from .source.safetensors import TensorSource

    config = {k: v for k, v in config.items() if k not in ("quantization_config", "auto_map")}
    with TensorSource(folder) as source:
        precision, quantized = quantized_modules(source)
        if precision is not None:
            with quiet_libraries():
                import bitsandbytes  # noqa: F401  (only quantized artifacts need it)
        plan = []
        for name in source.names:
            cast = (float_dtype is not None and source.dtype(name).is_floating_point
                    and not is_quant_tensor(name, quantized))
            plan.append(PlannedTensor(name, source.shape(name), float_dtype if cast else source.dtype(name),
                                      (lambda n=name, c=cast: source.get(n).to(float_dtype) if c else source.get(n))))
        return build_model(config, config[STRUCTURE_KEY], plan, precision, quantized)


def is_quant_tensor(name: str, quantized: set[str]) -> bool:
    module = name.rsplit(".weight", 1)[0] if ".weight" in name else name.rsplit(".", 1)[0]
    return f"{module}.weight" in quantized


def check_weights(folder: Path) -> dict[str, Any]:
    """config.json and every safetensors header, validated as the exporter validates a run's; returns the config.

    Hashes say a file is the one listed, not that it is sound: a header whose length or
    offsets lie would otherwise end in a traceback (or worse) inside the safetensors library.
    """
    from .hf_model import check_config, check_plan_fits
    from .modules import STRUCTURE_KEY
    from .source.files import read_json
    from .source.safetensors import TensorSource

    config = read_json(folder / "config.json", SEE)
    check_config(config, folder / "config.json", SEE)
    with TensorSource(folder, see=SEE) as source:  # the index's shard names and each shard's header
        infos = list(source.infos.values())
    if not config.get("quantization_config"):  # bitsandbytes tensors are packed; transformers checks those
        problem = check_plan_fits(config, config.get(STRUCTURE_KEY), [(i.name, i.shape, i.dtype) for i in infos])
        if problem:
            raise fail(f"load {folder.name}: its weights do not match its config.json: {problem}",
                       "re-download or re-export the artifact.", SEE)
    return config


def load_weights(folder: Path, layout: str, precision: str | None, dev: torch.device,
                 float_dtype: torch.dtype | None) -> torch.nn.Module:
    """The model of an artifact folder (files checked by :func:`check_weights`): transformers for dense/moe,
    our modules for compact."""
    config = check_weights(folder)
    if layout == "compact":
        return _load_compact(folder, config, float_dtype).to(dev)
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": float_dtype or "auto"}
    if precision in ("int4", "int8"):
        kwargs["device_map"] = str(dev)
        with quiet_libraries():  # bitsandbytes is imported here
            return AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    return AutoModelForCausalLM.from_pretrained(str(folder), **kwargs).to(dev)


def load_artifact(
    path: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    verify: bool = True,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> LoadedModel:
    """Load an exported artifact (folder or Hub repo id), verified, in eval mode."""
    dev, float_dtype = resolve_device(device), resolve_float_dtype(dtype, None)  # before any download or hashing
    folder = _local_folder(path, revision, token, endpoint)
    manifest = read_manifest(folder)
    layout = manifest.get("layout")
    if layout not in HF_LAYOUTS:
        raise fail(
            f"load a {layout!r} artifact with the runtime loader",
            "GGUF artifacts load in llama.cpp / Ollama / LM Studio; PEFT adapters with PeftModel.from_pretrained(base, DIR).",
            SEE,
        )
    precision = manifest.get("precision")
    if verify:
        tokenizer, model = _load_verified(folder, manifest, layout, precision, dev, float_dtype)
    else:
        tokenizer, model = load_tokenizer(folder), load_weights(folder, layout, precision, dev, float_dtype)
    meta = ModelMetadata(
        strategy=manifest.get("strategy") or "none",
        backbone=manifest.get("backbone") or "",
        path_type="artifact",
        checkpoint_dir=str(folder),
        lora_config=manifest.get("lora_config"),
        structure_preserved=bool(manifest.get("structure_preserved")),
        load_precision=precision,
    )
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, metadata=meta)


def _load_verified(folder: Path, manifest: dict[str, Any], layout: str, precision: str | None, dev: torch.device,
                   float_dtype: torch.dtype | None) -> tuple[Any, torch.nn.Module]:
    """Load while the weight files are hashed (:func:`verified_while_read`); return nothing unverified.

    Each file is read from disk once; the model built from a changed file is dropped
    unreturned. Weight files are only ever parsed as safetensors (headers validated first
    by :func:`check_weights`), never executed.
    """
    with verified_while_read(folder, manifest, workers=2):  # the load itself is mostly imports and mmap
        tokenizer = load_tokenizer(folder)
        model = load_weights(folder, layout, precision, dev, float_dtype)
    return tokenizer, model
