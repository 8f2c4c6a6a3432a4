"""Streaming, sharded safetensors writer: the exporter's sink.

Each shard file reserves room for its header (an upper bound computed from planned
names, shapes and dtypes), then receives tensor data one tensor at a time as the plan
produces it, and finally gets its real header written in front, padded with spaces
(valid JSON whitespace, as safetensors itself pads). No shard ever sits in memory; a
4-bit quant-state blob, whose exact length is known only after quantizing, fits because
offsets are recorded as data is written.
"""

from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..errors import fail
from ..plan import PlannedTensor, TensorPlan
from ..source.safetensors import SAFETENSORS_DTYPES

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def parse_size(size: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units like the Hub; GiB/MiB binary)."""
    from huggingface_hub.serialization._base import parse_size_to_int

    if isinstance(size, int):
        return size
    try:
        return parse_size_to_int(size.replace("iB", "IB").upper().replace("IB", "iB"))
    except ValueError:
        pass
    raise fail(f"read size {size!r}", "pass a size like 500MB, 5GB or 2GiB.", "efexport --help")


def split_shards(plan: TensorPlan, max_shard_size: int) -> list[TensorPlan]:
    """Greedy split in plan order; a tensor larger than the limit gets a shard of its own."""
    shards: list[TensorPlan] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s]


def _header_bound(shard: TensorPlan) -> int:
    total = sum(t.nbytes for t in shard)
    fake = {t.name: {"dtype": "BOOL", "shape": list(t.shape), "data_offsets": [total, total]} for t in shard}
    fake["__metadata__"] = {"format": "pt"}
    n = len(json.dumps(fake, separators=(",", ":"))) + 64
    return (n + 7) // 8 * 8


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().reshape(-1).cpu()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy())


def write_shard(path: Path, shard: TensorPlan, on_tensor: Callable[[PlannedTensor, int], None] | None = None) -> int:
    """Write one safetensors file from planned tensors; returns the bytes of tensor data written."""
    reserved = _header_bound(shard)
    header: dict[str, Any] = {}
    offset = 0
    with open(path, "wb") as fh, ThreadPoolExecutor(max_workers=1, thread_name_prefix="efexport-write") as writer:
        fh.seek(8 + reserved)
        pending = None  # one write in flight while the next tensor is read, merged and cast
        for planned in shard:
            streamed = planned.produce_rows is not None and planned.nbytes > STREAM_BYTES
            size, shape = 0, list(planned.shape)
            for piece in (_row_pieces(planned) if streamed else _whole(planned)):
                data = _tensor_bytes(piece)
                if pending is not None:
                    pending.result()
                pending = writer.submit(fh.write, data)  # the future holds `data` until it is written
                size += data.nbytes
                if not streamed:
                    shape = list(piece.shape)  # a quant-state blob may be shorter than planned
                del piece, data
            if streamed and size != planned.nbytes:
                raise RuntimeError(f"internal: {planned.name} streamed {size} bytes, planned {planned.nbytes}")
            header[planned.name] = {"dtype": DTYPE_NAMES[planned.dtype], "shape": shape,
                                    "data_offsets": [offset, offset + size]}
            offset += size
            if on_tensor is not None:
                on_tensor(planned, size)
        if pending is not None:
            pending.result()
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        if len(blob) > reserved:
            raise RuntimeError(f"internal: header of {path.name} outgrew its reserved space")
        fh.seek(0)
        fh.write(struct.pack("<Q", reserved))
        fh.write(blob + b" " * (reserved - len(blob)))
    return offset


STREAM_BYTES = 64 * 2**20  # tensors taken as they are and larger than this are written in row pieces
PIECE_BYTES = 16 * 2**20


def _whole(planned: PlannedTensor) -> Iterator[torch.Tensor]:
    """The tensor in one piece, checked against the plan."""
    t = planned.produce()
    if t.dtype != planned.dtype or (tuple(t.shape) != planned.shape and not _is_blob(planned, t)):
        raise RuntimeError(
            f"internal: {planned.name} produced {t.dtype}{list(t.shape)}, planned {planned.dtype}{list(planned.shape)}"
        )
    yield t


def _row_pieces(planned: PlannedTensor) -> Iterator[torch.Tensor]:
    """A large tensor taken as it is (the embedding) in blocks of rows, never whole."""
    rows = planned.shape[0]
    step = max(1, rows * PIECE_BYTES // max(1, planned.nbytes))
    for start in range(0, rows, step):
        piece = planned.produce_rows(start, min(rows, start + step))
        if piece.dtype != planned.dtype or tuple(piece.shape[1:]) != tuple(planned.shape[1:]):
            raise RuntimeError(f"internal: {planned.name} rows came as {piece.dtype}{list(piece.shape)}, "
                               f"planned {planned.dtype}{list(planned.shape)}")
        yield piece


def _is_blob(planned: PlannedTensor, t: torch.Tensor) -> bool:
    """Serialized quant-state blobs: 1-D uint8 no longer than planned."""
    return t.dtype == torch.uint8 and t.dim() == 1 and len(planned.shape) == 1 and t.shape[0] <= planned.shape[0]


def write_safetensors(plan: TensorPlan, out_dir: Path, max_shard_size: int,
                      on_tensor: Callable[[PlannedTensor, int], None] | None = None,
                      on_file: Callable[[Path], None] | None = None) -> list[str]:
    """Write the plan as model.safetensors, or shards + the Hugging Face index; returns file names.

    ``on_file(path)`` is called as soon as each file is complete (the exporter hashes it
    in the background while the next shard is being written).
    """
    done = on_file or (lambda path: None)
    shards = split_shards(plan, max_shard_size)
    if len(shards) == 1:
        write_shard(out_dir / WEIGHTS_NAME, shards[0], on_tensor)
        done(out_dir / WEIGHTS_NAME)
        return [WEIGHTS_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    total = 0
    for name, shard in zip(names, shards):
        total += write_shard(out_dir / name, shard, on_tensor)
        done(out_dir / name)
        weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names + [INDEX_NAME]
