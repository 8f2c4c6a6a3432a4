"""``efexport`` with proposed pipeline changes patched in, to measure them before they land.

    python benchmarks/whatif_export.py --patch pread,lazy-bnb -- RUN --out DIR --precision bf16 --quiet --no-verify

Runs the efexport CLI (``converter.cli.main``) in this process after monkeypatching
converter/ with the named changes; converter/ itself is not modified. The benchmark
harness measures it exactly like the real CLI (bench_export.py --whatif).

Patches:

``pread``     TensorSource.get reads each tensor with one positioned read into a fresh
              tensor instead of through ``safe_open``'s mmap. The mmap keeps every page of
              every source shard that was read mapped until the export ends, and those
              pages count in the process's RSS (file-backed): the whole checkpoint. With
              plain reads the page cache still serves the data, but RSS holds only the
              tensors in flight.
``lazy-bnb``  efexport.json's ``created_with.bitsandbytes`` from package metadata
              (importlib.metadata) instead of ``import bitsandbytes``, which imports
              torch._dynamo and costs seconds even for a bf16 export.
``hash-overlap``  sha256 of the source files (efexport.json's weights_sha256) computed in
              a background thread from the start, and of each output shard right after it
              is written, instead of reading everything again at the end (_finish).
              hashlib releases the GIL, so the hashing overlaps the merge / quantize work.
``merge-chunked``  W0 + s*B@A computed 256 output rows at a time (each block's float32
              temporaries stay in cache) and cast straight into the preallocated result,
              instead of whole-matrix float32 copies of W0, the sum and the cast; the
              K=r reduction per element is unchanged, so the bytes are the same.
``no-hash``   attribution only, not a proposal: every sha256 replaced by a constant, to
              measure what hashing (source digest + artifact manifest) costs end to end.
``nf4-fast``  NF4 quantization in cache-sized chunks with the same float operations as
              bitsandbytes' CPU kernel and bucketize replaced by 15 vectorised compares
              (byte-identical output; EFX_WHATIF_CHECK=1 checks every tensor against
              bitsandbytes).
"""

from __future__ import annotations

import json
import os
import struct
import sys

PATCHES = ("pread", "lazy-bnb", "nf4-fast", "hash-overlap", "merge-chunked", "no-hash")


def patch_pread() -> None:
    import torch

    from converter import source as src

    offsets: dict = {}

    def _offsets(path):
        cached = offsets.get(path)
        if cached is None:
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            cached = (8 + n, {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"})
            offsets[path] = cached
        return cached

    original = src.TensorSource.get

    def get(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        if info.file in self._pickled or info.file.suffix != ".safetensors":
            return original(self, name)
        base, table = _offsets(info.file)
        begin, end = table[name]
        t = torch.empty(info.shape, dtype=info.dtype)
        if end > begin:
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            fd = os.open(info.file, os.O_RDONLY)
            try:
                done = 0
                while done < end - begin:
                    got = os.preadv(fd, [view[done:]], base + begin + done)
                    if got <= 0:
                        raise OSError(f"short read in {info.file}")
                    done += got
            finally:
                os.close(fd)
        return t

    src.TensorSource.get = get


def patch_lazy_bnb() -> None:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from converter import __version__, export

    def _versions():
        from importlib.metadata import version as v

        out = {"efexport": __version__, "torch": torch.__version__.split("+")[0], "transformers": v("transformers")}
        try:
            out["bitsandbytes"] = version("bitsandbytes")
        except PackageNotFoundError:
            out["bitsandbytes"] = None
        return out

    export._versions = _versions


def nf4_fast(weight, blocksize: int = 64, chunk_blocks: int = 4096):
    """bitsandbytes' default CPU quantize_4bit (nf4), byte for byte, about 3x faster.

    The same float32 operations as the kernel (absmax, 1/absmax, multiply, clamp), but on
    cache-sized chunks (4096 blocks = 1 MiB of float32) instead of whole-tensor temporaries,
    and ``torch.bucketize(x, bounds)`` (a per-element binary search) replaced by its
    definition, the number of the 15 NF4 midpoints strictly below x, counted with 15
    vectorised compares into a uint8 accumulator."""
    import torch
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    bounds, _ = _get_4bit_quantize_bounds("nf4", weight.device)
    mids = bounds.tolist()
    flat = weight.reshape(-1)
    n = flat.numel()
    if n % blocksize or n % 2:
        return None  # the tail-block path: leave it to bitsandbytes
    blocks = n // blocksize
    absmax = torch.empty(blocks, dtype=torch.float32)
    packed = torch.empty(n // 2, dtype=torch.uint8)
    width = min(blocks, chunk_blocks) * blocksize
    gt = torch.empty(width, dtype=torch.bool)
    q = torch.empty(width, dtype=torch.uint8)
    for s in range(0, blocks, chunk_blocks):
        e = min(blocks, s + chunk_blocks)
        m = (e - s) * blocksize
        a = flat[s * blocksize: e * blocksize].float().view(-1, blocksize)
        am = a.abs().max(dim=-1)[0]
        absmax[s:e] = am
        x = torch.clamp(a * (1.0 / am.clamp(min=1e-38).view(-1, 1)), -1, 1).view(-1)
        qm, gm = q[:m], gt[:m]
        torch.gt(x, mids[0], out=gm)
        qm.copy_(gm)
        for mid in mids[1:]:
            torch.gt(x, mid, out=gm)
            qm.add_(gm)
        torch.bitwise_or(qm[::2] << 4, qm[1::2], out=packed[s * blocksize // 2: e * blocksize // 2])
    return packed.unsqueeze(1), absmax


def patch_nf4_fast() -> None:
    import bitsandbytes.functional as F
    import torch

    original = F.quantize_4bit
    check = os.environ.get("EFX_WHATIF_CHECK") == "1"

    def quantize_4bit(A, absmax=None, out=None, blocksize=64, compress_statistics=False, quant_type="fp4",
                      quant_storage=torch.uint8):
        if (A.device.type != "cpu" or quant_type != "nf4" or quant_storage != torch.uint8 or absmax is not None
                or out is not None or A.dtype not in (torch.bfloat16, torch.float16, torch.float32)):
            return original(A, absmax, out, blocksize, compress_statistics, quant_type, quant_storage)
        fast = nf4_fast(A, blocksize)
        if fast is None:
            return original(A, absmax, out, blocksize, compress_statistics, quant_type, quant_storage)
        packed, am = fast
        # The rest is bitsandbytes' own quantize_4bit after its kernel call (nested quantization, QuantState).
        code = F.get_4bit_type(quant_type, device=A.device)
        input_shape = A.shape
        if compress_statistics:
            offset = am.mean()
            qabsmax, state2 = F.quantize_blockwise(am - offset, blocksize=256)
            del am
            state = F.QuantState(absmax=qabsmax, shape=input_shape, dtype=A.dtype, blocksize=blocksize, code=code,
                                 quant_type=quant_type, offset=offset, state2=state2)
        else:
            state = F.QuantState(absmax=am, shape=input_shape, dtype=A.dtype, blocksize=blocksize, code=code,
                                 quant_type=quant_type)
        if check:
            ref_packed, ref_state = original(A, None, None, blocksize, compress_statistics, quant_type, quant_storage)
            assert torch.equal(ref_packed, packed), "nf4-fast: packed bytes differ"
            assert torch.equal(ref_state.absmax, state.absmax), "nf4-fast: absmax differs"
        return packed, state

    F.quantize_4bit = quantize_4bit


def patch_hash_overlap() -> None:
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from converter import export, manifest, pipeline, safetensors_sink

    pool = ThreadPoolExecutor(max_workers=1)
    futures: dict = {}
    original_hash = manifest.sha256_file

    def _key(path):
        st = os.stat(path)
        return (os.path.realpath(path), st.st_size, st.st_mtime_ns)

    def submit(path):
        k = _key(path)
        if k not in futures:
            futures[k] = pool.submit(original_hash, Path(path))

    def sha256_file(path, *args, **kwargs):
        fut = futures.get(_key(path))
        if fut is not None:
            digest = fut.result()
            progress = kwargs.get("progress")
            if progress is not None:
                progress(os.stat(path).st_size)
            return digest
        return original_hash(path, *args, **kwargs)

    manifest.sha256_file = sha256_file
    export.sha256_file = sha256_file

    original_open = pipeline.open_pipeline

    def open_pipeline(*args, **kwargs):
        pipe = original_open(*args, **kwargs)
        for f in sorted(pipe.source.files):
            submit(f)
        return pipe

    pipeline.open_pipeline = open_pipeline
    export.open_pipeline = open_pipeline

    original_write = safetensors_sink.write_shard

    def write_shard(path, *args, **kwargs):
        n = original_write(path, *args, **kwargs)
        submit(path)
        return n

    safetensors_sink.write_shard = write_shard


def patch_merge_chunked(rows: int = 256) -> None:
    import torch

    from converter import transforms
    from converter.plan import PlannedTensor

    def merge_into(w0, a, b, scale, dtype):
        out = torch.empty(w0.shape, dtype=dtype)
        a32, b32 = a.to(torch.float32), b.to(torch.float32)
        for r in range(0, w0.shape[0], rows):
            blk = torch.addmm(w0[r:r + rows].to(torch.float32), b32[r:r + rows], a32, alpha=scale)
            out[r:r + rows] = blk  # the cast (float32 -> dtype) happens on the copy
        return out

    original = transforms._merged

    def _merged(r, base, a, b, scale, out):
        planned = original(r, base, a, b, scale, out)  # keeps the shape checks and errors
        dtype = r.dtype(base)
        return PlannedTensor(planned.name, planned.shape, planned.dtype,
                             lambda: merge_into(r.get(base), r.get(a), r.get(b), scale, dtype),
                             lambda: merge_into(r.get(base), r.get(a), r.get(b), scale, torch.float32))

    transforms._merged = _merged


def patch_no_hash() -> None:
    from converter import export, manifest

    stub = lambda path, *a, **k: "0" * 64  # noqa: E731
    manifest.sha256_file = stub
    export.sha256_file = stub


def main() -> None:
    argv = sys.argv[1:]
    patches: list[str] = []
    if argv[:1] == ["--patch"]:
        patches = [p for p in argv[1].split(",") if p]
        argv = argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    unknown = set(patches) - set(PATCHES)
    if unknown:
        raise SystemExit(f"unknown patches {sorted(unknown)}; known: {', '.join(PATCHES)}")
    for p in patches:
        {"pread": patch_pread, "lazy-bnb": patch_lazy_bnb, "nf4-fast": patch_nf4_fast,
         "hash-overlap": patch_hash_overlap, "merge-chunked": patch_merge_chunked, "no-hash": patch_no_hash}[p]()
    from converter.cli import main as cli_main

    sys.argv = ["efexport", *argv]
    cli_main()


if __name__ == "__main__":
    main()
