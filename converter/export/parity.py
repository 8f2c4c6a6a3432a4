"""Parity for every format: the source run in float32 against the artifact in the engine that reads it."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import fail
from ..parity import run_parity, within_tolerance
from .options import SEE
from .prepared import Prepared


def measure_parity(prepared: Prepared, candidate_logits: Callable[[list[torch.Tensor]], list[torch.Tensor]],
                   engine: str | None = None) -> dict[str, Any]:
    """The source run in float32 through the loader vs ``candidate_logits(batches)``."""
    from ..loader import load_model

    opts = prepared.opts
    return run_parity(
        lambda: load_model(opts.run, checkpoint=opts.checkpoint, device="cpu", dtype="float32", base_model=opts.base_model),
        candidate_logits, num_parameters=prepared.pipe.num_parameters(), candidate_bytes=prepared.planned_bytes,
        engine=engine,
    )


def require_tolerance(parity: dict[str, Any], precision: str | None, source_is_fp32: bool, what: str,
                      fp32_rel: float | None = None) -> None:
    """Stop a float export whose logits drifted beyond its tolerance (nothing reaches --out).

    ``what`` completes "keep this …": e.g. "export: its logits".
    """
    kwargs = {} if fp32_rel is None else {"fp32_rel": fp32_rel}
    if not within_tolerance(parity, precision, source_is_fp32, **kwargs):
        raise fail(
            f"keep this {what} differ from the source by {parity['max_abs_logit_diff']:.3g} "
            f"(max |logit| {parity['max_abs_logit']:.3g}), beyond the {precision or 'source-dtype'} tolerance",
            "report this as a bug with `efexport inspect RUN --json`; nothing was written to --out.",
            SEE,
        )
