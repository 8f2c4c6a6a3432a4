"""The one pipeline: source -> strategy transform -> precision -> (a sink).

:func:`open_pipeline` does everything that reads only JSON and safetensors headers
(path detection, checkpoint choice, strategy detection and cross-check, layout choice,
tensor planning), so all user errors surface before any tensor data is read. The
loader (:mod:`converter.loader`) and the exporter (:mod:`converter.export`) are two
sinks of the plan it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch

from .layouts import STRUCTURED, Target, build_target, choose_layout, meta_model, quantizable_names
from .plan import TensorPlan
from .precision import apply_precision, base_dtype
from .run import Injection, ResolvedRun, infer_injection, resolve
from .source import TensorSource
from .transforms import Reader

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "added_tokens.json")


@dataclass
class Pipeline:
    run: ResolvedRun
    source: TensorSource
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
        return lambda name: name.endswith(".router.weight") or ".lora_A." in name or ".lora_B." in name

    def planned(self, precision: str | None, float_dtype: torch.dtype | None = None) -> TensorPlan:
        """The target's tensors after the precision stage."""
        quantizable = self.quantizable if precision in ("int4", "int8") else set()
        return apply_precision(self.target.plan, precision, quantizable, self.keep_dtype(), float_dtype)

    def source_dtype(self) -> torch.dtype:
        """The dtype most of the source's float weights are stored in."""
        counts: dict[torch.dtype, int] = {}
        for info in self.source.infos.values():
            if info.dtype.is_floating_point:
                n = 1
                for d in info.shape:
                    n *= d
                counts[info.dtype] = counts.get(info.dtype, 0) + n
        return max(counts, key=counts.get) if counts else torch.float32

    def tokenizer_dir(self) -> Path | None:
        candidates = [self.run.checkpoint_dir, self.run.run_dir, self.run.extras.get("base_dir")]
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
    if run.source_kind == "peft_adapter":
        from .adapters import open_adapter_source

        source, injection, reader = open_adapter_source(run)
    else:
        source = TensorSource(run.checkpoint_dir)
        shapes = {n: source.shape(n) for n in source.names}
        injection = infer_injection(run, source.names, shapes)
        reader = Reader.of(source)
    try:
        layout = choose_layout(injection, run.backbone, moe_layout, for_loading=for_loading)
        if injection.strategy in STRUCTURED and not run.backbone:
            from .errors import fail

            raise fail(
                f"rebuild the {injection.strategy} structure: the backbone is unknown",
                'add "backbone": "qwen3" | "llama" | "gemma3" to resolved_config.json.',
                "docs: README.md#loading-a-run",
            )
        target = build_target(reader, run.hf_config, injection, run.backbone, layout)
    except Exception:
        source.close()
        raise
    return Pipeline(run, source, injection, target)

