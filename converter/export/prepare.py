"""Every check before the first byte is written: inputs, options, template, disk, --out, Hub credentials."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..card import load_template
from ..errors import fail
from ..pipeline import open_pipeline
from ..plan import plan_nbytes
from ..sinks.safetensors import parse_size
from .gguf import GgufFormat
from .hf import HfFormat
from .options import SEE, ExportOptions
from .peft import PeftFormat
from .prepared import Format, Prepared
from .record import preview_card
from .staging import check_disk, check_out

FORMATS: dict[str, Format] = {"hf": HfFormat(), "gguf": GgufFormat(), "peft": PeftFormat()}


def prepare(opts: ExportOptions) -> Prepared:
    """Check everything (reading JSON and headers only) and open the pipeline; raises EfexportError."""
    fmt = FORMATS.get(opts.fmt)
    if fmt is None:
        raise fail(f"export format {opts.fmt!r}", f"pass --format {'|'.join(FORMATS)}.", SEE)
    opts = fmt.check_options(opts)
    parse_size(opts.max_shard_size)
    template = load_template(opts.template)
    opts = replace(opts, out=Path(opts.out).expanduser().resolve())
    check_out(opts.out, opts.force)
    pipe = open_pipeline(opts.run, opts.checkpoint, moe_layout=opts.moe_layout, base_model=opts.base_model,
                         download_base=opts.download_base)
    try:
        plan = fmt.plan(opts, pipe)
        planned = plan_nbytes(plan)
        check_disk(opts.out.parent, planned * fmt.disk_factor)
        prepared = Prepared(opts, fmt, pipe, plan, template, planned)
        preview_card(prepared)
        if opts.push:
            from ..hub import preflight

            p = opts.push
            prepared.hub_api = preflight(repo_id=p.repo_id, token=p.token, endpoint=p.endpoint, private=p.private,
                                         revision=p.revision, create=not opts.dry_run)
        return prepared
    except BaseException:
        pipe.close()
        raise
