"""The one pipeline: source -> strategy -> precision, and nothing else (a sink takes the plan).

:func:`open_pipeline` does everything that reads only JSON and safetensors headers
(path detection, checkpoint choice, strategy detection and cross-check, layout choice,
tensor planning), so all user errors surface before any tensor data is read. The
loader (:mod:`converter.loader`) and the exporter (:mod:`converter.export`) hand the plan
it returns to a sink.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import SEE_LOADING, fail
from .hf_model import meta_model, quantizable_names
from .inputs import refuse_quantized
from .modules import ADAPTER_MODULES
from .plan import TensorPlan, numel
from .precision import apply_precision
from .source.peft_adapter import AdapterSource
from .source.resolve import resolve
from .source.run_dir import ResolvedRun
from .source.safetensors import TensorSource
from .strategy.injection import Injection, infer_injection
from .strategy.layouts import STRUCTURED, Target, build_target, choose_layout
from .strategy.peft_merge import open_adapter_source
from .strategy.reader import Reader


@dataclass
class Pipeline:
    run: ResolvedRun
    source: TensorSource | AdapterSource
    injection: Injection
    target: Target

    @cached_property
    def quantizable(self) -> set[str]:
        """Weights bitsandbytes would quantize, read off a meta model of the target (built once)."""
        return quantizable_names(meta_model(self.target.hf_config, self.target.structure))

    def keep_dtype(self) -> Callable[[str], bool]:
        """Compact layouts keep routers and LoRA factors as the run had them."""
        if self.target.layout != "compact":
            return lambda name: False
        return lambda name: name.count(".") >= 2 and name.rsplit(".", 2)[-2] in ADAPTER_MODULES

    def planned(self, precision: str | None, float_dtype: torch.dtype | None = None) -> TensorPlan:
        """The target's tensors after the precision stage."""
        quantizable = self.quantizable if precision in ("int4", "int8") else set()
        return apply_precision(self.target.plan, precision, quantizable, self.keep_dtype(), float_dtype)

    def source_dtype(self) -> torch.dtype:
        """The dtype most of the source's float weights are stored in."""
        counts: dict[torch.dtype, int] = {}
        for info in self.source.infos.values():
            if info.dtype.is_floating_point:
                counts[info.dtype] = counts.get(info.dtype, 0) + numel(info.shape)
        return max(counts, key=counts.get) if counts else torch.float32

    def num_parameters(self) -> int:
        """Elements of the target model (the figure cards and GGUF metadata give)."""
        return sum(numel(t.shape) for t in self.target.plan)

    def config_dirs(self) -> list[Path | None]:
        """Where generation_config.json may be: the checkpoint, then a PEFT adapter's base."""
        return [self.run.checkpoint_dir, self.run.adapter and self.run.adapter.base_dir]

    def tokenizer_dir(self) -> Path | None:
        candidates = [self.run.checkpoint_dir, self.run.run_dir, self.run.adapter and self.run.adapter.base_dir]
        for d in candidates:
            if d is not None and any((Path(d) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
                return Path(d)
        return None

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_pipeline(path: str | Path, checkpoint: str | int = "final", *, moe_layout: str | None = None,
                  for_loading: bool = False, base_model: str | None = None, download_base: bool = False) -> Pipeline:
    """Resolve, read headers, detect and plan; no tensor data is read here."""
    run = resolve(path, checkpoint, base_model=base_model, download_base=download_base)
    refuse_quantized(run.checkpoint_dir, run.hf_config)  # before a shape error could blame the checkpoint
    if run.adapter is not None:
        run, source, injection, reader = open_adapter_source(run)
    else:
        source = TensorSource(run.checkpoint_dir)
        shapes = {n: source.shape(n) for n in source.names}
        injection = infer_injection(run, source.names, shapes)
        reader = Reader.of(source)
    try:
        layout = choose_layout(injection, run.backbone, moe_layout, for_loading=for_loading)
        if injection.strategy in STRUCTURED and not run.backbone:
            raise fail(
                f"rebuild the {injection.strategy} structure: the backbone is unknown",
                'add "backbone": "qwen3" | "llama" | "gemma3" to resolved_config.json.',
                SEE_LOADING,
            )
        target = build_target(reader, run.hf_config, injection, run.backbone, layout)
    except Exception:
        source.close()
        raise
    return Pipeline(run, source, injection, target)

