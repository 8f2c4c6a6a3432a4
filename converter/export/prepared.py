"""An export after every check: the options, the opened pipeline, its plan, and the format that writes it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..pipeline import Pipeline
from ..plan import TensorPlan
from .hashes import BackgroundHashes
from .options import ExportOptions


class Format(Protocol):
    """One output format: its checks, its plan and its writer (one object per format)."""

    name: str
    disk_factor: int  # how many times the planned bytes the disk must hold while writing

    def check_options(self, opts: ExportOptions) -> ExportOptions: ...
    def plan(self, opts: ExportOptions, pipe: Pipeline) -> TensorPlan: ...
    def layout(self, pipe: Pipeline) -> str: ...
    def quantization(self, precision: str | None) -> dict[str, Any] | None: ...
    def write(self, prepared: "Prepared", tmp: Path) -> dict[str, Any]: ...


@dataclass
class Prepared:
    opts: ExportOptions
    fmt: Format
    pipe: Pipeline
    plan: TensorPlan
    template: Any
    planned_bytes: int
    hub_api: Any = None
    hashes: BackgroundHashes | None = None

    def summary(self) -> dict[str, Any]:
        run, t = self.pipe.run, self.pipe.target
        return {
            "run": str(self.opts.run), "out": str(self.opts.out), "path_type": run.path_type,
            "checkpoint": run.checkpoint, "checkpoint_dir": run.checkpoint_dir.name,
            "strategy": self.pipe.injection.strategy, "backbone": run.backbone, "format": self.opts.fmt,
            "layout": self.fmt.layout(self.pipe),
            "architecture": t.architecture, "precision": self.opts.precision, "tensors": len(self.plan),
            "planned_bytes": self.planned_bytes, "max_shard_size": self.opts.max_shard_size,
        }
