"""``--format gguf``: one GGUF file and an Ollama Modelfile; parity measured in llama.cpp itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import fail
from ..pipeline import Pipeline
from ..plan import TensorPlan
from ..precision import FLOAT_DTYPES
from ..sinks.gguf import (TYPE_LABELS, TokenizerFiles, check_gguf_request, gguf_filename, llama_cpp_available,
                          llama_cpp_logits, write_gguf, write_modelfile)
from .options import SEE, ExportOptions
from .parity import measure_parity, require_tolerance
from .prepared import Prepared
from .record import finish
from .staging import progress

SOURCE_TYPES = {dtype: name for name, dtype in FLOAT_DTYPES.items()}


def source_gguf_type(pipe: Pipeline) -> str:
    return SOURCE_TYPES.get(pipe.source_dtype(), "fp32")


def check_gguf(pipe: Pipeline, gguf_type: str) -> None:
    """Refuse, in three lines, what llama.cpp cannot read: no tokenizer, a compact layout, an unknown config."""
    tok = pipe.tokenizer_dir()
    if tok is None:
        raise fail("write GGUF: the run has no tokenizer files", "add tokenizer.json to the checkpoint folder.", SEE)
    if pipe.target.layout == "compact":
        raise fail(
            f"write {pipe.injection.strategy} on {pipe.run.backbone or 'this backbone'} as GGUF: llama.cpp has no architecture for its structure",
            "export --format hf (compact layout, loads with the runtime loader), or a dense/native-MoE run.",
            SEE,
        )
    check_gguf_request(pipe.target.hf_config, gguf_type, tok)


class GgufFormat:
    name = "gguf"
    disk_factor = 1  # every type, K-quants included, is written straight into its file

    def check_options(self, opts: ExportOptions) -> ExportOptions:
        return opts

    def plan(self, opts: ExportOptions, pipe: Pipeline) -> TensorPlan:
        check_gguf(pipe, opts.precision or source_gguf_type(pipe))
        return pipe.target.plan

    def layout(self, pipe: Pipeline) -> str:
        return "gguf"

    def quantization(self, precision: str | None) -> dict[str, Any] | None:
        """The file type asked for; write() adds the per-tensor type mix read back from the file."""
        return {"method": "gguf", "file_type": TYPE_LABELS.get(precision or "", precision)} if precision else None

    def write(self, prepared: Prepared, tmp: Path) -> dict[str, Any]:
        opts, pipe = prepared.opts, prepared.pipe
        gtype = opts.precision or source_gguf_type(pipe)
        name = opts.name or (pipe.run.run_name or pipe.run.checkpoint_dir.name)
        filename = gguf_filename(name, gtype)
        tok = TokenizerFiles(pipe.tokenizer_dir())  # its files parsed once for the GGUF and the Modelfile
        with progress(prepared.planned_bytes, "gguf", opts.progress) as bar:
            report = write_gguf(prepared.plan, pipe.target.hf_config, tok, tmp / filename, gtype, name=name,
                                metadata={"base_model": pipe.run.base_model, "license": opts.license},
                                progress=bar.update, threads=opts.threads)
        write_modelfile(tmp, filename, tok)
        if prepared.hashes:
            prepared.hashes.file(tmp / filename)  # hashed while parity runs
        parity = _parity(prepared, tmp / filename) if opts.verify else {"skipped": "--no-verify"}
        require_tolerance(parity, gtype, pipe.source_dtype() == torch.float32, "GGUF: in llama.cpp its logits",
                          fp32_rel=1e-3)
        # the type mix as written (reading the file back parses its whole vocabulary: seconds, hundreds of MB)
        quantization = {"method": "gguf", "file_type": report["file_type"], "tensor_types": report.pop("tensor_types")}
        return finish(prepared, tmp, {"layout": "gguf", "parity": parity, "precision": gtype, "gguf": report,
                                      "quantization": quantization, "versions": gguf_versions()})


def _parity(prepared: Prepared, gguf_file: Path) -> dict[str, Any]:
    if not llama_cpp_available():
        return {"skipped": "llama-cpp-python is not installed (pip install 'efexport[gguf]')", "reference": "source run, float32"}
    probes: list[list[int]] = []

    def gguf_logits(batches: list[torch.Tensor]) -> list[torch.Tensor]:
        probes[:] = [b[0].tolist() for b in batches]  # recorded: `efexport verify` reruns these ids in llama.cpp
        return [llama_cpp_logits(gguf_file, ids).unsqueeze(0) for ids in probes]

    versions = gguf_versions()
    parity = measure_parity(prepared, gguf_logits, engine=f"llama.cpp {versions.get('llama.cpp') or ''} "
                            f"(llama-cpp-python {versions.get('llama-cpp-python')})".replace("  ", " "))
    if "skipped" not in parity:
        parity["probe_ids"] = probes
    return parity


def gguf_versions() -> dict[str, str | None]:
    """The gguf writer, llama-cpp-python, and llama.cpp's own version string where the bindings expose it."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for key, dist in (("gguf", "gguf"), ("llama-cpp-python", "llama_cpp_python")):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = None
    if out["llama-cpp-python"]:
        try:
            import llama_cpp

            out["llama.cpp"] = llama_cpp.llama_version().decode()
        except Exception:  # older bindings without llama_version()
            out["llama.cpp"] = None
    return out
