"""Export: the file sink of the pipeline, written atomically and checked for parity.

Order of work, so that nothing is lost or half-written:
1. :func:`prepare` runs every check (inputs, options, template, disk space, --out
   collisions, Hub credentials) and reads no tensor data;
2. weights are streamed into a temporary folder beside --out, then config, tokenizer,
   card and efexport.json, all fsynced;
3. parity is measured on the temporary folder; an fp export beyond tolerance stops here;
4. the folder is renamed into place (an old artifact replaced only now, with --force).
On any error, Ctrl-C or SIGTERM the temporary folder is removed and --out is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from . import __version__
from .errors import fail
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, file_entries, sha256_file
from .pipeline import TOKENIZER_FILES, Pipeline, open_pipeline
from .plan import TensorPlan, plan_nbytes
from .precision import bnb_config, check_precision, quantization_record, require_bitsandbytes

SEE = "docs: README.md#exporting"
FORMATS = ("hf", "gguf", "peft")
TMP_MARK = ".efexport-tmp-"


@dataclass
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
    push: dict[str, Any] | None = None  # {"repo_id", "token", "endpoint", "private", "revision", "commit_message"}
    progress: bool = True


class BackgroundHashes:
    """sha256 of finished files (and of the source weights) on a worker thread.

    hashlib releases the GIL, so on two cores hashing shard N overlaps writing shard N+1
    instead of re-reading every file at the end.
    """

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="efexport-hash")
        self._files: dict[str, Any] = {}
        self.source = None

    def hash_source(self, pipe: Pipeline) -> None:
        self.source = self._pool.submit(_weights_digest, pipe)

    def file(self, path: Path) -> None:
        self._files[path.name] = self._pool.submit(sha256_file, path)

    def known(self) -> dict[str, str]:
        return {name: future.result() for name, future in self._files.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Prepared:
    opts: ExportOptions
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
            "layout": t.layout if self.opts.fmt == "hf" else {"gguf": "gguf", "peft": "peft_adapter"}[self.opts.fmt],
            "architecture": t.architecture, "precision": self.opts.precision, "tensors": len(self.plan),
            "planned_bytes": self.planned_bytes, "max_shard_size": self.opts.max_shard_size,
        }


# -- 1. checks -------------------------------------------------------------------------
def prepare(opts: ExportOptions) -> Prepared:
    """Every check before the first byte is written; raises EfexportError."""
    from .card import load_template
    from .safetensors_sink import parse_size

    if opts.fmt not in FORMATS:
        raise fail(f"export format {opts.fmt!r}", f"pass --format {'|'.join(FORMATS)}.", SEE)
    if opts.fmt == "hf":
        opts.precision = check_precision(opts.precision)
        require_bitsandbytes(opts.precision)
    parse_size(opts.max_shard_size)
    template = load_template(opts.template)
    out = Path(opts.out).expanduser().resolve()
    opts.out = out
    _check_out(out, opts.force)
    pipe = open_pipeline(opts.run, opts.checkpoint, moe_layout=opts.moe_layout, base_model=opts.base_model,
                         download_base=opts.download_base)
    try:
        if opts.fmt == "gguf":
            plan = _prepare_gguf(opts, pipe)
        elif opts.fmt == "peft":
            from .peft_sink import check_peft_export

            if opts.precision is not None:
                raise fail(f"write a PEFT adapter at precision {opts.precision}: adapters keep the run's LoRA factors as trained",
                           "drop --precision for --format peft (quantize the base model at serving time instead).", SEE)
            plan = check_peft_export(pipe)
        else:
            plan = pipe.planned(opts.precision)
        planned = plan_nbytes(plan)
        _check_disk(out.parent, planned * (2 if opts.fmt == "gguf" else 1))
        prepared = Prepared(opts, pipe, plan, template, planned)
        preview_card(prepared)
        if opts.push:
            from .hub import preflight

            prepared.hub_api = preflight(**{k: opts.push.get(k) for k in ("repo_id", "token", "endpoint", "private", "revision")},
                                         create=not opts.dry_run)
        return prepared
    except BaseException:
        pipe.close()
        raise


def _prepare_gguf(opts: ExportOptions, pipe: Pipeline) -> TensorPlan:
    from .gguf_sink import check_gguf_request

    tok = pipe.tokenizer_dir()
    if tok is None:
        raise fail("write GGUF: the run has no tokenizer files", "add tokenizer.json to the checkpoint folder.", SEE)
    if pipe.target.layout == "compact":
        raise fail(
            f"write {pipe.injection.strategy} on {pipe.run.backbone or 'this backbone'} as GGUF: llama.cpp has no architecture for its structure",
            "export --format hf (compact layout, loads with the runtime loader), or a dense/native-MoE run.",
            SEE,
        )
    check_gguf_request(pipe.target.hf_config, opts.precision or _source_gguf_type(pipe), tok)
    return pipe.target.plan


def _source_gguf_type(pipe: Pipeline) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(pipe.source_dtype(), "fp32")


def _check_out(out: Path, force: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise fail(f"write to {out}: it is a file", "pass --out a folder path.", SEE)
        if any(out.iterdir()):
            if not force:
                raise fail(f"write to {out}: the folder exists and is not empty",
                           "pass --force to replace it (the old one stays until the new one is complete), or choose another --out.", SEE)
            if not (out / MANIFEST).is_file():
                raise fail(f"replace {out}: it is not an efexport artifact (no {MANIFEST}), so --force will not delete it",
                           "choose another --out, or empty the folder yourself.", SEE)
    if not out.parent.exists():
        raise fail(f"write to {out}: the parent folder {out.parent} does not exist", "create it first, or choose another --out.", SEE)
    if not os.access(out.parent, os.W_OK):
        raise fail(f"write to {out.parent}: permission denied", "choose an --out you can write to.", SEE)


def _check_disk(folder: Path, planned: int) -> None:
    free = shutil.disk_usage(folder).free
    need = int(planned * 1.05) + 64 * 1024 * 1024
    if free < need:
        raise fail(f"export here: about {need / 1e9:.2f} GB is needed but {free / 1e9:.2f} GB is free on {folder}",
                   "free some disk space, or pass --out on a larger disk.", SEE)


# -- 2./3./4. writing --------------------------------------------------------------------
@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so cleanup runs on `kill` too."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def clean_stale(out: Path) -> None:
    """Temporary folders left by a killed export (kill -9) of the same --out."""
    for p in out.parent.glob(f".{out.name}{TMP_MARK}*"):
        pid = p.name.rsplit("-", 2)[-2] if p.name.count("-") >= 2 else ""
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _progress(total: int, desc: str, enabled: bool, unit: str = "B"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=None if enabled else True,
                leave=False, dynamic_ncols=True)


def run_export(prepared: Prepared) -> dict[str, Any]:
    """Write, check, and move the artifact into place; returns the efexport.json record."""
    opts, pipe = prepared.opts, prepared.pipe
    out = opts.out
    clean_stale(out)
    tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    started = time.time()
    prepared.hashes = BackgroundHashes()
    prepared.hashes.hash_source(pipe)
    try:
        with _sigterm_as_interrupt():
            tmp.mkdir()
            if opts.fmt == "gguf":
                record = _write_gguf(prepared, tmp)
            elif opts.fmt == "peft":
                from .peft_sink import write_peft

                record = _finish(prepared, tmp, write_peft(prepared, tmp))
            else:
                record = _write_hf(prepared, tmp)
            _fsync_tree(tmp)
            _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        prepared.hashes.close()
        pipe.close()
    record["_seconds"] = round(time.time() - started, 2)
    return record


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        old = out.parent / f".{out.name}{TMP_MARK}old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)


def _write_hf(prepared: Prepared, tmp: Path) -> dict[str, Any]:
    from .safetensors_sink import parse_size, write_safetensors

    opts, pipe = prepared.opts, prepared.pipe
    with _progress(prepared.planned_bytes, "export", opts.progress) as bar:
        write_safetensors(prepared.plan, tmp, parse_size(opts.max_shard_size), lambda t, n: bar.update(n),
                          on_file=prepared.hashes.file if prepared.hashes else None)
    config = _artifact_config(pipe, opts.precision)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if pipe.target.layout == "compact":
        (tmp / "modeling_efexport.py").write_text(remote_code_source(pipe.target.hf_config))
    _copy_side_files(pipe, tmp)
    parity = _hf_parity(prepared, tmp) if opts.verify else {"skipped": "--no-verify", "reference": "source run, float32"}
    from .parity import within_tolerance

    if not within_tolerance(parity, opts.precision, pipe.source_dtype() == torch.float32):
        raise fail(
            f"keep this export: its logits differ from the source by {parity['max_abs_logit_diff']:.3g} "
            f"(max |logit| {parity['max_abs_logit']:.3g}), beyond the {opts.precision or 'source-dtype'} tolerance",
            "report this as a bug with `efexport inspect RUN --json`; nothing was written to --out.",
            SEE,
        )
    return _finish(prepared, tmp, {"layout": pipe.target.layout, "parity": parity})


def _artifact_config(pipe: Pipeline, precision: str | None) -> dict[str, Any]:
    from .layouts import SKIP_QUANT

    config = dict(pipe.target.hf_config)
    config.pop("transformers_version", None)
    config.pop("torch_dtype", None)
    dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int4": "bfloat16", "int8": "bfloat16"}
    config["dtype"] = dtype.get(precision or "", str(pipe.source_dtype()).removeprefix("torch."))
    if precision in ("int4", "int8"):
        skip = list(SKIP_QUANT) if pipe.target.layout == "compact" else None
        config["quantization_config"] = bnb_config(precision, skip)
    if pipe.target.layout == "compact":
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_efexport.EfexportForCausalLM"}
    return config


def remote_code_source(hf_config: dict[str, Any]) -> str:
    """modeling_efexport.py: converter/modules.py verbatim plus a generated model class."""
    from importlib import resources

    base = (hf_config.get("architectures") or ["AutoModelForCausalLM"])[0]
    # Routers and LoRA factors are written as the run had them (precision touches base
    # Linears only); the run's dtype is the best record of theirs this function gets.
    adapter_dtype = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32").removeprefix("torch.")
    if adapter_dtype not in ("float32", "bfloat16", "float16"):
        adapter_dtype = "float32"
    source = resources.files("converter").joinpath("modules.py").read_text(encoding="utf-8")
    footer = f'''

# ---- generated by efexport {__version__}: the class trust_remote_code loads ----
from transformers import {base} as _EfexportBase

_ADAPTER_MODULES = ("router", "lora_A", "lora_B")
_ADAPTER_DTYPE = "{adapter_dtype}"


class EfexportForCausalLM(_EfexportBase):
    """{base} with the run's structure (see apply_structure above)."""

    def __init__(self, config):
        super().__init__(config)
        structure = getattr(config, STRUCTURE_KEY)
        apply_structure(self, structure)
        self.post_init()
        # from_pretrained casts every tensor to config.dtype unless the empty model already
        # holds it in another dtype, or a keep-in-fp32 rule names it (the plain
        # _keep_in_fp32_modules acts only for float16; the strict one for bf16 too).
        # Routers and LoRA factors keep the dtype they were written in, as the runtime loader does.
        adapter = getattr(torch, structure.get("adapter_dtype") or _ADAPTER_DTYPE)
        for name, module in self.named_modules():
            if name.rsplit(".", 1)[-1] in _ADAPTER_MODULES:
                module.to(adapter)
        keep = set(_ADAPTER_MODULES) if adapter == torch.float32 else set()
        self._keep_in_fp32_modules = set(self._keep_in_fp32_modules or ()) | keep
        self._keep_in_fp32_modules_strict = set(self._keep_in_fp32_modules_strict or ()) | keep
'''
    return source + footer


def _copy_side_files(pipe: Pipeline, tmp: Path) -> None:
    tok = pipe.tokenizer_dir()
    if tok is not None:
        for name in TOKENIZER_FILES:
            if (tok / name).is_file():
                shutil.copy2(tok / name, tmp / name)
    for d in (pipe.run.checkpoint_dir, pipe.run.extras.get("base_dir")):
        if d is not None and (Path(d) / "generation_config.json").is_file():
            shutil.copy2(Path(d) / "generation_config.json", tmp / "generation_config.json")
            break


def measure_parity(prepared: Prepared, candidate_logits, engine: str | None = None) -> dict[str, Any]:
    """The source run in float32 through the loader vs ``candidate_logits(batches)`` (every format's parity)."""
    from .loader import load_model
    from .parity import run_parity

    opts = prepared.opts
    return run_parity(
        lambda: load_model(opts.run, checkpoint=opts.checkpoint, device="cpu", dtype="float32", base_model=opts.base_model),
        candidate_logits, num_parameters=_num_parameters(prepared.pipe), candidate_bytes=prepared.planned_bytes,
        engine=engine,
    )


def _hf_parity(prepared: Prepared, tmp: Path) -> dict[str, Any]:
    from .parity import logits_of
    from .runtime import load_weights

    layout, precision = prepared.pipe.target.layout, prepared.opts.precision
    return measure_parity(
        prepared, lambda batches: logits_of(load_weights(tmp, layout, precision, torch.device("cpu"), None), batches))


def _write_gguf(prepared: Prepared, tmp: Path) -> dict[str, Any]:
    from .gguf_sink import gguf_filename, write_gguf, write_modelfile

    opts, pipe = prepared.opts, prepared.pipe
    gtype = opts.precision or _source_gguf_type(pipe)
    name = opts.name or (pipe.run.run_name or pipe.run.checkpoint_dir.name)
    filename = gguf_filename(name, gtype)
    tok = pipe.tokenizer_dir()
    with _progress(prepared.planned_bytes, "gguf", opts.progress) as bar:
        report = write_gguf(prepared.plan, pipe.target.hf_config, tok, tmp / filename, gtype, name=name,
                            metadata={"base_model": pipe.run.base_model, "license": opts.license},
                            progress=bar.update)
    write_modelfile(tmp, filename, tok)
    if prepared.hashes:
        prepared.hashes.file(tmp / filename)  # hashed while parity runs
    parity = _gguf_parity(prepared, tmp / filename) if opts.verify else {"skipped": "--no-verify"}
    from .parity import within_tolerance

    if not within_tolerance(parity, gtype, pipe.source_dtype() == torch.float32, fp32_rel=1e-3):
        raise fail(
            f"keep this GGUF: in llama.cpp its logits differ from the source by {parity['max_abs_logit_diff']:.3g} "
            f"(max |logit| {parity['max_abs_logit']:.3g}), beyond the {gtype} tolerance",
            "report this as a bug with `efexport inspect RUN --json`; nothing was written to --out.",
            SEE,
        )
    return _finish(prepared, tmp, {"layout": "gguf", "parity": parity, "precision": gtype, "gguf": report})


def _gguf_parity(prepared: Prepared, gguf_file: Path) -> dict[str, Any]:
    try:
        import llama_cpp
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install 'efexport[gguf]')", "reference": "source run, float32"}
    from .gguf_sink import llama_cpp_logits

    return measure_parity(
        prepared, lambda batches: [llama_cpp_logits(gguf_file, b[0].tolist()).unsqueeze(0) for b in batches],
        engine=f"llama.cpp {llama_cpp.__version__}")


def _num_parameters(pipe: Pipeline) -> int:
    total = 0
    for t in pipe.target.plan:
        n = 1
        for d in t.shape:
            n *= d
        total += n
    return total


def _record(prepared: Prepared, part: dict[str, Any], files: dict[str, Any]) -> dict[str, Any]:
    """The efexport.json record (artifact-format.md §4) for what was written."""
    opts, pipe, run = prepared.opts, prepared.pipe, prepared.pipe.run
    precision = part.get("precision", opts.precision)
    record: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "strategy": pipe.injection.strategy,
        "layout": part["layout"],
        "structure_preserved": part["layout"] in ("moe", "compact") or pipe.target.layout == "moe",
        "backbone": run.backbone or None,
        "architecture": pipe.target.architecture or None,
        "base_model": _public_base_model(run.base_model),
        "precision": precision,
        "quantization": quantization_record(precision) if opts.fmt == "hf" else None,
        "lora_config": pipe.injection.lora_config,
        "num_parameters": _num_parameters(pipe),
        "source": {
            "kind": run.source_kind,
            "run_name": run.run_name,
            "checkpoint": run.checkpoint,
            "step": run.step,
            "weights_sha256": part.get("weights_sha256"),
        },
        "files": files,
        "parity": part.get("parity"),
        "created_with": _versions(),
    }
    if "gguf" in part:
        record["gguf"] = {k: v for k, v in part["gguf"].items() if k in ("arch", "tensor_count", "file_type")}
    return record


def _render(prepared: Prepared, record: dict[str, Any]) -> str:
    from .card import render_card

    repo_ref = (prepared.opts.push or {}).get("repo_id") or prepared.opts.out.name
    return render_card(prepared.template, record, license=prepared.opts.license, repo_ref=repo_ref)


def preview_card(prepared: Prepared) -> str:
    """Render the card once with placeholder figures, so a broken template fails before writing."""
    layout = prepared.summary()["layout"]
    fake_files = {"model.safetensors": {"sha256": "0" * 64, "size": 0}}
    parity = {"prompts": 4, "max_abs_logit_diff": 0.0, "max_abs_logit": 1.0, "top1_agreement": 1.0,
              "reference": "source run, float32"}
    return _render(prepared, _record(prepared, {"layout": layout, "parity": parity}, fake_files))


def _finish(prepared: Prepared, tmp: Path, part: dict[str, Any]) -> dict[str, Any]:
    """Card, then efexport.json over every other file."""
    hashes = prepared.hashes
    digest = hashes.source.result() if hashes and hashes.source else _weights_digest(prepared.pipe)
    part = {**part, "weights_sha256": digest}
    known = hashes.known() if hashes else {}
    total = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file() and p.name not in known)
    with _progress(total, "hash", prepared.opts.progress) as bar:
        files = file_entries(tmp, progress=bar.update, known=known)
    record = _record(prepared, part, files)
    card = tmp / "README.md"
    card.write_text(_render(prepared, record), encoding="utf-8")
    files["README.md"] = {"sha256": sha256_file(card), "size": card.stat().st_size}  # the only new file
    record["files"] = dict(sorted(files.items()))
    (tmp / MANIFEST).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def _public_base_model(base: str | None) -> str | None:
    """Hub ids are kept; a local absolute path is never written into an artifact."""
    if not base:
        return None
    return None if os.path.isabs(base) or base.startswith(("~", ".")) else base


def _weights_digest(pipe: Pipeline) -> str:
    """sha256 over the source weight files' sha256s: identifies exactly which weights were exported."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(pipe.source.files):
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def _versions() -> dict[str, str | None]:
    """Library versions from package metadata (importing bitsandbytes alone costs seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"efexport": __version__}
    for name in ("torch", "transformers", "bitsandbytes"):
        try:
            out[name] = version(name).split("+")[0]
        except PackageNotFoundError:
            out[name] = None
    return out


def export(opts: ExportOptions) -> dict[str, Any]:
    """Check, then write. The API behind `efexport RUN --out DIR`."""
    prepared = prepare(opts)
    if opts.dry_run:
        prepared.pipe.close()
        return {"dry_run": True, **prepared.summary()}
    record = run_export(prepared)
    if opts.push:
        from .errors import EfexportError
        from .hub import push_artifact

        p = opts.push
        try:
            result = push_artifact(opts.out, p["repo_id"], api=prepared.hub_api,
                                   **{k: p.get(k) for k in ("revision", "commit_message", "private")})
        except EfexportError as exc:  # the artifact is complete: say how to publish it without exporting again
            again = (f"efexport push {opts.out} {p['repo_id']}" + (f" --revision {p['revision']}" if p.get("revision") else "")
                     + (f" --endpoint {p['endpoint']}" if p.get("endpoint") else "") + (" --private" if p.get("private") else ""))
            fix = exc.fix.replace("re-run the same command", f"run `{again}`")
            if again not in fix:
                fix += f"; then publish it with `{again}` (no need to export again)"
            raise fail(f"{exc.cannot} (the export itself is complete at {opts.out})", fix, exc.see) from None
        record["_push"] = {"repo_id": result.repo_id, "url": result.url, "commit_id": result.commit_id,
                           "revision": result.revision}
    return record
