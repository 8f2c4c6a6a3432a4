"""``load_model()``: load a training run in one call, as the in-memory sink of the pipeline."""

from __future__ import annotations

from pathlib import Path

from .errors import fail
from .inputs import artifact_record
from .loaded import SEE, LoadedModel, ModelMetadata, load_tokenizer, resolve_device, resolve_float_dtype
from .pipeline import open_pipeline
from .precision import check_precision, require_bitsandbytes
from .quiet import quiet_libraries
from .sinks.model import build_model

HF_LAYOUTS = ("dense", "moe", "compact")


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
    precision = check_precision(load_precision)
    dev = resolve_device(device)
    float_dtype = resolve_float_dtype(dtype, precision)
    require_bitsandbytes(precision)
    artifact = load_as_artifact(path, precision, device, dtype)
    if artifact is not None:
        return artifact
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


def load_as_artifact(path: str | Path, precision: str | None, device: str, dtype: str) -> LoadedModel | None:
    """An efexport artifact loads as written, through the runtime loader (files verified first).

    None when ``path`` is not an artifact the runtime loader reads, or when a float artifact
    is asked for another precision (then it is read like any Hugging Face folder).
    """
    record = artifact_record(path)
    if record is None or record.get("layout") not in HF_LAYOUTS:
        return None
    written = record.get("precision")
    quantized = written in ("int4", "int8")
    if precision is not None and precision != written:
        if not quantized:
            return None
        raise fail(f"load {Path(path).name} at {precision}: it is an {written} artifact, and its weights are "
                   "already quantized", f"load it as written (load_precision=None), or export the run at {precision}.",
                   SEE)
    from .runtime import load_artifact

    with quiet_libraries(progress_bars=False):  # load_model shows no loading bars for runs either
        return load_artifact(path, device=device, dtype=dtype)
