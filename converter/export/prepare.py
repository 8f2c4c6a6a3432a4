"""Every check before the first byte is written: inputs, options, template, disk, --out, Hub credentials."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..card import load_template
from ..errors import fail
from ..hf_model import check_plan_fits
from ..pipeline import Pipeline, open_pipeline
from ..plan import plan_nbytes
from ..sinks.safetensors import parse_size
from ..source.files import read_json
from .gguf import GgufFormat
from .hf import HfFormat
from .options import SEE, ExportOptions
from .peft import PeftFormat
from .prepared import Format, Prepared
from .record import preview_card
from .staging import check_disk, check_out, existing_ancestor

FORMATS: dict[str, Format] = {"hf": HfFormat(), "gguf": GgufFormat(), "peft": PeftFormat()}


def check_fits(pipe: Pipeline) -> None:
    """The planned tensors are exactly the model the target config describes (names, shapes, float-ness).

    Checked from headers before writing, so an export nothing loads (``--no-verify``)
    still cannot ship a model that transformers would refuse, or fill in at random.
    """
    t = pipe.target
    try:
        problem = check_plan_fits(t.hf_config, t.structure, [(p.name, p.shape, p.dtype) for p in t.plan])
    except Exception as exc:  # transformers cannot build the model this config describes
        problem = f"transformers cannot build it ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"
    if problem:
        raise fail(f"export {pipe.run.checkpoint_dir.name}: its weights do not match its config.json: {problem}",
                   "the checkpoint is incomplete or its config.json was changed; re-save it from the training run.",
                   SEE)


def check_generation_config(pipe: Pipeline) -> None:
    """The generation_config.json the artifact will carry is one transformers accepts when loading it."""
    for folder in pipe.config_dirs():
        if folder is not None and (Path(folder) / "generation_config.json").is_file():
            path = Path(folder) / "generation_config.json"
            read_json(path, SEE)
            try:
                from transformers import GenerationConfig

                GenerationConfig.from_pretrained(str(folder))
            except Exception as exc:  # transformers' own validation of its fields
                raise fail(f"read {path.name} ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})",
                           f"fix or remove {path}.", SEE) from None
            return


def check_tokenizer(pipe: Pipeline) -> None:
    """The tokenizer files the artifact will carry load in transformers (an artifact is complete with them)."""
    folder = pipe.tokenizer_dir()
    if folder is None:
        return
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # a damaged tokenizer.json / tokenizer_config.json: any complaint
        raise fail(f"load the tokenizer in {folder.name} ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})",
                   f"repair or re-save the tokenizer files in {folder}.", SEE) from None


def check_threads(threads: object) -> None:
    """--threads N: a whole number of threads, at least one."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise fail(f"use {threads!r} threads: expected a whole number, 1 or more",
                   "pass --threads N with N >= 1, or leave it out to use all cores.", SEE)


def prepare(opts: ExportOptions) -> Prepared:
    """Check everything (reading JSON and headers only) and open the pipeline; raises EfexportError."""
    check_threads(opts.threads)
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
        check_fits(pipe)
        check_tokenizer(pipe)
        check_generation_config(pipe)
        plan = fmt.plan(opts, pipe)
        planned = plan_nbytes(plan)
        check_disk(existing_ancestor(opts.out), planned * fmt.disk_factor)
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
