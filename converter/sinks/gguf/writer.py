"""Writing the GGUF: header and metadata first, then each tensor produced, encoded and written in turn.

Every tensor's name, shape and GGML type is registered first, the header, the
key/value metadata and the tensor infos are written, and only then is each tensor
produced, transformed, quantized and written, one at a time, so memory stays bounded
by the largest tensor group (a layer's experts for MoE). F32/F16/BF16/Q8_0/Q4_0/Q5_0
are encoded here (``gguf.quants``); the K-quants go through an F16 file in a
temporary folder beside the output, quantized by llama.cpp (:mod:`.llama_cpp`). The
file appears under its name only once complete.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ...errors import fail
from ...plan import PlannedTensor
from .checks import check_model
from .config import SEE
from .llama_cpp import llama_quantize
from .metadata import add_general, add_hparams
from .quant import K_QUANTS, TYPE_LABELS, default_gguf_type, file_type, nbytes
from .tensors import OutTensor, build_outputs
from .tokenizer import TokenizerFiles, tokenizer_files
from .vocab import add_vocab, check_name_for_llama_cpp, identify_vocab

CHUNK_ELEMS = 4 * 1024 * 1024  # rows are encoded in chunks of about 16 MB of float32


class EncodedTensor:
    """One tensor's GGML bytes, encoded and written chunk by chunk.

    ``GGUFWriter.write_tensor_data`` only needs ``nbytes`` and ``tofile``; handing it
    this object instead of a full array means neither the whole float32 copy nor the
    whole encoded array has to exist next to the source tensor. Given a reader of source
    rows (``OutTensor.rows``) not even the source tensor is held whole: each chunk is
    read, encoded and written in turn.
    """

    def __init__(self, rows: Callable[[int, int], torch.Tensor], shape: tuple[int, ...], qtype: Any) -> None:
        self.rows, self.qtype = rows, qtype
        self.n_rows, self.row_len = shape[0], int(np.prod(shape[1:]))  # 2-D: a tensor's rows or `of`'s flat view
        self.nbytes = nbytes(shape, qtype)

    @classmethod
    def of(cls, t: torch.Tensor, qtype: Any) -> "EncodedTensor":
        """A tensor already in memory, encoded in chunks of its innermost rows all the same."""
        t = t.detach().to("cpu")
        flat = t.reshape(-1, t.shape[-1]) if t.ndim else t.reshape(1, 1)
        return cls(lambda a, b: flat[a:b], tuple(flat.shape), qtype)

    def _chunks(self) -> Iterable[np.ndarray]:
        import gguf

        Q = gguf.GGMLQuantizationType
        step = max(1, CHUNK_ELEMS // max(1, self.row_len))
        for r0 in range(0, self.n_rows, step):
            chunk = self.rows(r0, min(self.n_rows, r0 + step)).reshape(-1, self.row_len)
            if self.qtype == Q.BF16:
                yield chunk.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
                continue
            arr = chunk.to(torch.float32).contiguous().numpy()
            if self.qtype == Q.F32:
                yield arr
            elif self.qtype == Q.F16:
                yield arr.astype(np.float16)
            else:
                yield gguf.quants.quantize(arr, self.qtype)

    def tofile(self, fout: Any) -> None:
        written = 0
        for c in self._chunks():
            c.tofile(fout)
            written += c.nbytes
        if written != self.nbytes:  # pragma: no cover - would be a bug in the type rules
            raise RuntimeError(f"encoded {written} bytes, planned {self.nbytes}")


def _progress_cb(progress: Any) -> Callable[[int], None]:
    if progress is None:
        return lambda n: None
    if hasattr(progress, "update"):
        return lambda n: progress.update(n)
    return progress


def _produced(o: OutTensor) -> torch.Tensor:
    t = o.produce()
    if tuple(t.shape) != tuple(o.shape):
        raise fail(
            f"write GGUF tensor {o.name}: produced shape {tuple(t.shape)} differs from the planned {tuple(o.shape)}",
            "report this as a bug in the export plan", SEE,
        )
    return t


def write_stream(outs: list[OutTensor], w: Any, path: Path, progress: Callable[[int], None]) -> None:
    """Header, metadata and tensor infos, then each tensor's data; ``w`` is closed either way."""
    for o in outs:
        w.add_tensor_info(o.name, o.shape, np.dtype(np.float32), nbytes(o.shape, o.qtype), raw_dtype=o.qtype)
    try:
        w.write_header_to_file(path=path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for o in outs:
            data = EncodedTensor(o.rows, o.shape, o.qtype) if o.rows is not None else EncodedTensor.of(_produced(o), o.qtype)
            w.write_tensor_data(data)  # type: ignore[arg-type]  # duck-typed: nbytes + tofile
            progress(int(data.nbytes))
            del data
    finally:
        w.close()


def write_gguf(
    plan: list[PlannedTensor],
    hf_config: dict,
    tokenizer_dir: Path | TokenizerFiles,
    out_file: Path,
    gguf_type: str | None,
    *,
    name: str,
    metadata: dict | None = None,
    progress: Any = None,
) -> dict:
    """Stream ``plan`` into ``out_file`` as a GGUF of ``gguf_type``; return a small report.

    ``metadata`` may carry ``base_model`` (Hub id or list), ``license``, ``author``,
    ``version``, ``finetune``, ``description``, ``tags``, ``languages``,
    ``quantized_by``. ``progress`` is a callable(n_bytes) or a tqdm.
    """
    import gguf

    out_file = Path(out_file)
    tok = tokenizer_files(tokenizer_dir)
    if gguf_type is None:
        mats = [p.dtype for p in plan if len(p.shape) >= 2]
        gguf_type = default_gguf_type(mats[0] if mats else torch.float32)
    gguf_type = gguf_type.lower()
    fam = check_model(hf_config, gguf_type)
    info = identify_vocab(tok)
    check_name_for_llama_cpp(name, tok, info)
    outs = build_outputs(plan, hf_config, fam, gguf_type)
    n_params = sum(o.n_params for o in outs)
    cb = _progress_cb(progress)
    out_file.parent.mkdir(parents=True, exist_ok=True)

    def make_writer() -> "gguf.GGUFWriter":
        w = gguf.GGUFWriter(path=None, arch=fam.arch)
        add_general(w, name, metadata, n_params)
        add_hparams(w, hf_config, fam, file_type(gguf_type))
        add_vocab(w, info, tok, hf_config, fam)
        return w

    partial = out_file.with_name(out_file.name + ".partial")
    try:
        if gguf_type in K_QUANTS:
            with tempfile.TemporaryDirectory(prefix=".efexport-gguf-", dir=out_file.parent) as tmp:
                inter = Path(tmp) / "intermediate-F16.gguf"
                write_stream(outs, make_writer(), inter, cb)
                llama_quantize(inter, partial, gguf_type)
        else:
            write_stream(outs, make_writer(), partial, cb)
        os.replace(partial, out_file)
    finally:
        if partial.exists():
            partial.unlink()

    return {
        "arch": fam.arch,
        "gguf_type": gguf_type,
        "file_type": TYPE_LABELS[gguf_type],
        "file": out_file.name,
        "tensor_count": len(outs),
        "file_size": out_file.stat().st_size,
        "n_params": n_params,
        "tokenizer_model": info.kind,
        "tokenizer_pre": info.pre,
        "vocab_size": int(hf_config["vocab_size"]),
    }
