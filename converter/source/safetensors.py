"""Lazy, tensor-by-tensor access to a checkpoint's weights.

Headers are read and validated up front (dtype, shape, offsets within the file, index
entries inside the checkpoint folder), so a truncated or tampered file fails with a
three-line error before any work; tensor data is read only when asked for, one name
at a time, with a positioned read at the offset the header gives. Legacy pickle checkpoints are read only
with ``torch.load(weights_only=True, mmap=True)``: no arbitrary code can run.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SEE_LOADING, fail
from .files import read_json

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = -1  # absolute byte offset of the data in a safetensors file
    nbytes: int = 0


def read_safetensors_header(path: Path, see: str = SEE_LOADING) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors header without reading tensor data.

    The same rules the safetensors library enforces, checked here so that a file made
    by someone else fails with the three-line error naming it instead of a traceback from
    deep inside a loader: the header length lies within the file, the header is a JSON
    object of entries with a known dtype, a shape of non-negative integers and offsets
    that tile the data exactly (in order, no gap, no overlap, nothing past the end).
    """
    size = path.stat().st_size
    bad = lambda why: fail(  # noqa: E731
        f"read {path.name}: {why}",
        f"the file is corrupt or truncated; re-copy or re-save {path}.",
        see,
    )
    if size < 8:
        raise bad("the file is shorter than a safetensors header")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > MAX_HEADER or 8 + n > size:
            raise bad(f"the header claims {n} bytes but the file has {size}")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise bad("the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("its __metadata__ is not a table of strings")
    data_size = size - 8 - n
    out: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise bad(f"the header entry for {name!r} is not an object")
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
        if dtype is None:
            raise bad(f"tensor {name!r} has unsupported dtype {str(entry.get('dtype'))[:40]!r}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(_natural(d) for d in shape):
            raise bad(f"tensor {name!r} has an invalid shape {str(shape)[:60]}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(x) for x in offsets):
            raise bad(f"tensor {name!r} has invalid data_offsets {str(offsets)[:60]}")
        begin, end = offsets
        if begin > end or end > data_size or end - begin != math.prod(shape) * dtype.itemsize:
            raise bad(f"tensor {name!r} lies outside the file or has the wrong length (truncated?)")
        spans.append((begin, end, name))
        out[name] = TensorInfo(name, tuple(shape), dtype, path, 8 + n + begin, end - begin)
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise bad(f"tensor {name!r} {'overlaps another' if begin < at else 'leaves a gap before it'} in the data")
        at = end
    if at != data_size:
        raise bad(f"its data has {data_size - at} bytes no tensor accounts for")
    return out


def _natural(x: object) -> bool:
    """A non-negative JSON integer (``true`` is not one)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_finite(name: str, file: Path, t: torch.Tensor) -> torch.Tensor:
    """Weights holding NaN or inf are refused: the run diverged, and its export would compute nothing useful.

    One min/max pass (NaN and inf propagate into it), about 20x cheaper than ``isfinite``.
    """
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):
        raise fail(
            f"use tensor {name!r} of {file.name}: it holds NaN or infinite values (the training diverged?)",
            "pick an earlier checkpoint (--checkpoint best|N) or retrain; efexport never exports or loads non-finite "
            "weights.",
            SEE_LOADING,
        )
    return t


class TensorSource:
    """Named tensors of one checkpoint folder, read on demand."""

    def __init__(self, checkpoint_dir: Path, weights_prefix: str = "model", see: str = SEE_LOADING) -> None:
        self.dir = Path(checkpoint_dir)
        self.see = see  # the README section a damaged file's error points at
        self.infos: dict[str, TensorInfo] = {}
        self._fds: dict[Path, int] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        files = self._weight_files(weights_prefix)
        for f in files:
            infos = read_safetensors_header(f, see) if f.suffix == ".safetensors" else self._pickle_infos(f)
            for name, info in infos.items():
                if name in self.infos:
                    raise fail(
                        f"read {self.dir.name}: tensor {name!r} appears in both {self.infos[name].file.name} and {f.name}",
                        "re-save the checkpoint; shards must not overlap.",
                        self.see,
                    )
                self.infos[name] = info
        self.files = files

    # -- discovery -------------------------------------------------------------
    def _weight_files(self, prefix: str) -> list[Path]:
        d = self.dir
        single = d / f"{prefix}.safetensors"
        index = d / f"{prefix}.safetensors.index.json"
        if prefix == "model":
            legacy_single, legacy_index = d / "pytorch_model.bin", d / "pytorch_model.bin.index.json"
        else:
            legacy_single, legacy_index = d / f"{prefix}.bin", d / f"{prefix}.bin.index.json"
        if single.is_file():
            return [single]
        if index.is_file():
            return self._index_files(index)
        if legacy_single.is_file():
            return [legacy_single]
        if legacy_index.is_file():
            return self._index_files(legacy_index)
        raise fail(
            f"find weights in {d.name}: no {prefix}.safetensors, sharded index or pytorch_model.bin",
            "point at a checkpoint folder that holds the saved weights.",
            self.see,
        )

    def _index_files(self, index: Path) -> list[Path]:
        weight_map = read_json(index, self.see).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
            raise fail(f"read {index.name}: it has no weight_map of tensor names to shard file names",
                       f"re-save the checkpoint in {self.dir}.", self.see)
        root = self.dir.resolve()
        files: list[Path] = []
        for shard in dict.fromkeys(weight_map.values()):
            p = self.dir / shard  # may be a symlink into a Hub cache's blobs/: judge the name, not the target
            if Path(shard).name != shard or shard in (".", "..") or p.parent.resolve() != root:
                raise fail(
                    f"read {index.name}: shard {shard!r} points outside the checkpoint folder",
                    "refusing to read it; re-save the checkpoint with shards beside the index.",
                    self.see,
                )
            if not p.is_file():
                raise fail(
                    f"read {index.name}: shard {shard} is missing",
                    f"copy the missing shard into {self.dir}.",
                    self.see,
                )
            files.append(p)
        return files

    def _pickle_infos(self, path: Path) -> dict[str, TensorInfo]:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # pickle that needs more than plain tensors
            raise fail(
                f"read legacy checkpoint {path.name} safely: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}",
                "only plain tensor pickles are read (weights_only=True); re-save the checkpoint as safetensors.",
                self.see,
            ) from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise fail(
                f"read legacy checkpoint {path.name}: it is not a flat dict of tensors",
                "re-save the checkpoint as safetensors.",
                self.see,
            )
        self._pickled[path] = sd
        return {k: TensorInfo(k, tuple(v.shape), v.dtype, path) for k, v in sd.items()}

    # -- access ----------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.infos[name].dtype

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from disk (the only place tensor data is read).

        A positioned read into a fresh buffer rather than a memory map: pages of a mapped
        checkpoint would stay resident in this process and its RSS would grow to the model's
        size; a read buffer is freed as soon as the tensor is done with.
        """
        info = self.infos[name]
        if info.file in self._pickled:
            return check_finite(name, info.file, self._pickled[info.file][name])
        return check_finite(name, info.file, self._pread(info, 0, info.nbytes).view(info.dtype).reshape(info.shape))

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of a tensor (along its first dimension), read on their own:
        a sink can stream a large tensor taken as it is (the embedding) in pieces."""
        info = self.infos[name]
        if info.file in self._pickled:
            return check_finite(name, info.file, self._pickled[info.file][name][start:stop])
        row_bytes = info.nbytes // max(1, info.shape[0])
        stop = min(stop, info.shape[0])
        buf = self._pread(info, start * row_bytes, (stop - start) * row_bytes)
        return check_finite(name, info.file, buf.view(info.dtype).reshape(stop - start, *info.shape[1:]))

    def _pread(self, info: TensorInfo, start: int, nbytes: int) -> torch.Tensor:
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], info.offset + start + done)
            if got <= 0:
                raise fail(f"read {info.file.name}: it ended early (truncated while reading?)",
                           f"re-copy or re-save {info.file}.", self.see)
            done += got
        return buf

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._pickled.clear()

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
