"""Parity for every format: the source run in float32 against the artifact in the engine that reads it.

The source side streams: the pipeline produces each planned tensor (LoRA merged in
float32) when its decoder layer runs, so the run is never built whole.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from ..errors import fail
from ..parity import run_parity, within_tolerance
from ..streaming import Streamed, plan_unit_bytes, streamed_model
from .options import SEE
from .prepared import Prepared


def measure_parity(prepared: Prepared, candidate_logits: Callable[[list[torch.Tensor]], list[torch.Tensor]],
                   engine: str | None = None) -> dict[str, Any]:
    """The source run in float32, streamed through the pipeline, vs ``candidate_logits(batches)``."""
    unit = max(plan_unit_bytes(prepared.pipe.target.plan, itemsize=4), plan_unit_bytes(prepared.plan))
    return run_parity(lambda: streamed_source(prepared), candidate_logits, unit_bytes=unit, engine=engine)


@contextmanager
def streamed_source(prepared: Prepared) -> Iterator[tuple[Streamed, Any]]:
    """The run as ``load_model(dtype="float32")`` would build it, as a :class:`Streamed` and its tokenizer."""
    from ..loaded import load_tokenizer
    from ..pipeline import open_pipeline

    opts = prepared.opts
    with open_pipeline(opts.run, opts.checkpoint, for_loading=True, base_model=opts.base_model) as pipe:
        plan = pipe.planned(None, torch.float32)
        yield streamed_model(pipe.target.hf_config, pipe.target.structure, plan), load_tokenizer(pipe.tokenizer_dir())


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
