"""What the user asked an export to do, as typed data (the CLI and the API build the same object)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SEE = "docs: README.md#exporting"


@dataclass(frozen=True)
class PushOptions:
    """Where ``--push-to-hub`` publishes the artifact once it is complete."""

    repo_id: str
    token: str | None = None
    endpoint: str | None = None
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None


@dataclass(frozen=True)
class ExportOptions:
    run: str
    out: Path
    checkpoint: str = "final"
    precision: str | None = None
    fmt: str = "hf"
    moe_layout: str | None = None
    max_shard_size: str = "5GB"
    template: Path | None = None
    force: bool = False
    dry_run: bool = False
    verify: bool = True
    base_model: str | None = None
    download_base: bool = False
    license: str | None = None
    name: str | None = None
    push: PushOptions | None = None
    progress: bool = True
    threads: int | None = None  # torch threads and encoder workers; None: torch's count (all cores)
