"""Writing the GGUF: header and metadata first, then each tensor produced, encoded and written in turn.

Every tensor's name, shape and GGML type is registered first, the header, the
key/value metadata and the tensor infos are written, and only then is each tensor
produced, transformed, quantized and written, one at a time, so memory stays bounded
by the largest tensor group (a layer's experts for MoE). F32/F16/BF16/Q8_0/Q4_0/Q5_0
are encoded here (``gguf.quants``). The K-quant files (``q4_k_m``, ``q5_k_m``,
``q6_k``) are written as llama.cpp's ``llama_model_quantize`` would make them from the
F16 file (:mod:`.kquants`: its order, type mix and key order), their quantized tensors
encoded in row blocks by llama.cpp's own quantizer (:mod:`.ggml`), with no intermediate
file. The file appears under its name only once complete.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ...errors import fail
from ...memory import release_free_memory
from ...plan import PlannedTensor
from .checks import check_model
from .config import SEE, n_experts, n_heads, n_kv_heads, n_layers
from .families import Family
from .ggml import RowQuantizer, ggml_base
from .kquants import Model, ggml_dims, keys_last, kquant_types, llama_order
from .metadata import add_general, add_hparams
from .quant import K_QUANTS, TYPE_LABELS, default_gguf_type, file_type, is_quantized, nbytes
from .tensors import OutTensor, build_outputs
from .tokenizer import TokenizerFiles, tokenizer_files
from .vocab import add_vocab, check_name_for_llama_cpp, identify_vocab

CHUNK_ELEMS = 4 * 1024 * 1024  # rows are encoded in chunks of about 16 MB of float32
BLOCK_ELEMS = 1024 * 1024  # llama.cpp's quantizer gets blocks of about 4 MB of float32, one per thread at a time

#: encodes blocks of rows (2-D tensors) into their GGML bytes, in order
Encoder = Callable[[Iterable[torch.Tensor]], Iterator[np.ndarray]]


class EncodedTensor:
    """One tensor's GGML bytes, encoded and written chunk by chunk.

    ``GGUFWriter.write_tensor_data`` only needs ``nbytes`` and ``tofile``; handing it
    this object instead of a full array means neither the whole float32 copy nor the
    whole encoded array has to exist next to the source tensor. Given a reader of source
    rows (``OutTensor.rows``) not even the source tensor is held whole: each chunk is
    read, encoded and written in turn.
    """

    def __init__(self, rows: Callable[[int, int], torch.Tensor], shape: tuple[int, ...], qtype: Any,
                 encoder: Encoder | None = None) -> None:
        self.rows, self.qtype, self.encoder = rows, qtype, encoder
        self.n_rows, self.row_len = shape[0], int(np.prod(shape[1:]))  # 2-D: a tensor's rows or `of`'s flat view
        self.nbytes = nbytes(shape, qtype)

    @classmethod
    def of(cls, t: torch.Tensor, qtype: Any, encoder: Encoder | None = None) -> "EncodedTensor":
        """A tensor already in memory, encoded in chunks of its innermost rows all the same."""
        t = t.detach().to("cpu")
        flat = t.reshape(-1, t.shape[-1]) if t.ndim else t.reshape(1, 1)
        return cls(lambda a, b: flat[a:b], tuple(flat.shape), qtype, encoder)

    def _pieces(self, elems: int) -> Iterator[torch.Tensor]:
        step = max(1, elems // max(1, self.row_len))
        for r0 in range(0, self.n_rows, step):
            yield self.rows(r0, min(self.n_rows, r0 + step)).reshape(-1, self.row_len)

    def _chunks(self) -> Iterable[np.ndarray]:
        import gguf

        Q = gguf.GGMLQuantizationType
        if self.encoder is not None:
            yield from self.encoder(self._pieces(BLOCK_ELEMS))
            return
        for chunk in self._pieces(CHUNK_ELEMS):
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


def write_stream(outs: list[OutTensor], w: Any, path: Path, progress: Callable[[int], None],
                 ggml: RowQuantizer | None = None, via: Sequence[Any] = ()) -> None:
    """Header, metadata and tensor infos, then each tensor's data; ``w`` is closed either way.

    With ``ggml`` (a K-quant file) the quantized tensors are encoded by llama.cpp's
    quantizer from the type ``via`` gives each in the F16 file, and shapes are written
    with ggml's count of dimensions, as llama.cpp writes its files.
    """
    for o in outs:
        shape = ggml_dims(o.shape) if ggml is not None else o.shape
        w.add_tensor_info(o.name, shape, np.dtype(np.float32), nbytes(o.shape, o.qtype), raw_dtype=o.qtype)
    try:
        w.write_header_to_file(path=path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, o in enumerate(outs):
            enc = ggml.encoder(o.qtype, via[i]) if ggml is not None and is_quantized(o.qtype) else None
            data = (EncodedTensor(o.rows, o.shape, o.qtype, enc) if o.rows is not None
                    else EncodedTensor.of(_produced(o), o.qtype, enc))
            w.write_tensor_data(data)  # type: ignore[arg-type]  # duck-typed: nbytes + tofile
            progress(int(data.nbytes))
            del data
            release_free_memory()  # the next tensor's buffers come fresh instead of beside freed ones
    finally:
        w.close()


def type_counts(outs: list[OutTensor]) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (K-quant files mix types by llama.cpp's rules)."""
    counts: dict[str, int] = {}
    for o in outs:
        counts[o.qtype.name] = counts.get(o.qtype.name, 0) + 1
    return dict(sorted(counts.items()))


def kquant_outputs(outs: list[OutTensor], hf_config: dict, fam: Family,
                   gguf_type: str) -> tuple[list[OutTensor], list[Any]]:
    """The tensors of the file ``llama_model_quantize`` makes from the F16 one, in its order, with its types;
    and each tensor's type in the F16 file (``outs`` as typed for it), which its values pass through."""
    import gguf

    Q = gguf.GGMLQuantizationType
    by_name = {o.name: o for o in outs}
    ordered = [by_name[n] for n in llama_order(list(by_name))]
    block = {t.name: size[0] for t, size in gguf.GGML_QUANT_SIZES.items()}
    n_exp = n_experts(hf_config)
    model = Model(fam.arch, n_layers(hf_config), n_heads(hf_config), n_kv_heads(hf_config), n_exp if n_exp > 1 else 0)
    types = kquant_types([(o.name, o.shape, Q(o.qtype).name) for o in ordered], gguf_type, model, block)
    return [dataclasses.replace(o, qtype=Q[t]) for o, t in zip(ordered, types)], [o.qtype for o in ordered]


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
    threads: int | None = None,
) -> dict:
    """Stream ``plan`` into ``out_file`` as a GGUF of ``gguf_type``; return a small report.

    ``metadata`` may carry ``base_model`` (Hub id or list), ``license``, ``author``,
    ``version``, ``finetune``, ``description``, ``tags``, ``languages``,
    ``quantized_by``. ``progress`` is a callable(n_bytes) or a tqdm. ``threads``: the
    K-quants' quantizer threads (default: all cores).
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
        if gguf_type in K_QUANTS:  # llama.cpp rewrites these two after copying the F16 file's keys
            keys_last(w.kv_data[0], (gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.FILE_TYPE))
        return w

    partial = out_file.with_name(out_file.name + ".partial")
    try:
        if gguf_type in K_QUANTS:
            ggml_base()  # found and loaded before anything is written
            outs, via = kquant_outputs(outs, hf_config, fam, gguf_type)
            with RowQuantizer(threads) as ggml:
                write_stream(outs, make_writer(), partial, cb, ggml, via)
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
        "tensor_types": type_counts(outs),
        "file_size": out_file.stat().st_size,
        "n_params": n_params,
        "tokenizer_model": info.kind,
        "tokenizer_pre": info.pre,
        "vocab_size": int(hf_config["vocab_size"]),
    }
