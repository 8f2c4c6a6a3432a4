"""efexport's NF4 / LLM.int8 encoders write bitsandbytes' own bytes, for every tensor and any shape.

bitsandbytes (CPU) is the reference: every output it would save (packed weight, absmax,
nested absmax and quant map, the quant-state JSON, SCB, int8 codes) is compared byte for
byte, on every quantizable tensor of the fixtures and on awkward random shapes.
"""

from __future__ import annotations

import threading
import zlib

import pytest
import torch
from fixtures.runs import BACKBONES
from helpers import assert_three_lines, run_cli
from safetensors import safe_open

from converter import EfexportError
from converter.encoders import (blockwise_nested, dynamic_code, encode_int8, encode_nf4, in_chunks, nf4_code,
                                nf4_codes, torch_threads)
from converter.export import ExportOptions, export
from converter.pipeline import open_pipeline

bnbf = pytest.importorskip("bitsandbytes.functional")


def bnb_nf4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """What Params4bit._quantize + save_pretrained write for a weight (keys after 'weight')."""
    packed, state = bnbf.quantize_4bit(weight.to(torch.bfloat16).contiguous(), blocksize=64, compress_statistics=True,
                                       quant_type="nf4", quant_storage=torch.uint8)
    return {"": packed, **{f".{k}": v for k, v in state.as_dict(packed=True).items()}}


def bnb_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cb, scb, _ = bnbf.int8_vectorwise_quant(weight.to(torch.bfloat16).to(torch.float16).contiguous())
    return cb, scb


def assert_same_bytes(weight: torch.Tensor, threads: int | None = None, what: str = "") -> None:
    ours, theirs = encode_nf4(weight, threads), bnb_nf4(weight)
    assert list(ours) == list(theirs), what
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, (what, k)
        assert torch.equal(ours[k], theirs[k]), (what, k)
    if weight.dim() == 2:
        (cb, scb), (cb_ref, scb_ref) = encode_int8(weight, threads), bnb_int8(weight)
        assert cb.dtype == cb_ref.dtype == torch.int8 and torch.equal(cb, cb_ref), what
        assert scb.dtype == scb_ref.dtype == torch.float32 and torch.equal(scb, scb_ref), what


def test_code_books_are_bitsandbytes_own():
    assert torch.equal(nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnbf.create_dynamic_map())


def test_nf4_code_equals_bucketize_on_every_top_half_and_at_the_midpoints():
    code = nf4_code()
    mids = (code[:-1] + code[1:]) / 2
    top = torch.arange(1 << 16, dtype=torch.int64) << 16
    values = [mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)]
    for low in (0, 1, 0x7FFF, 0x8000, 0xFFFF):  # every sign, exponent and 7 mantissa bits, at both ends
        bits = top | low
        x = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)
        values.append(x[x.isfinite()])
    x = torch.cat(values)
    assert torch.equal(nf4_codes(x).long(), torch.bucketize(x, mids).long())


def test_nested_quantization_equals_bitsandbytes_quantize_blockwise():
    g = torch.Generator().manual_seed(1)
    # Bin edges of bitsandbytes' 65536-bin lookup table and their float32 neighbours, in blocks whose absmax is 1.
    j = torch.arange(0, 65536, 7, dtype=torch.float64)
    edges = (-1 + (2 * j - 1) / 65535).float()
    near = torch.cat([edges, torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)])
    near = near.clamp(-1, 1)[:near.numel() // 255 * 255].view(-1, 255)
    near = torch.cat([torch.ones(near.shape[0], 1), near], 1).view(-1)
    cases = {
        "lut edges": near,
        "absmax minus its mean": torch.rand(70001, generator=g) * 0.03,
        "zero blocks": torch.cat([torch.zeros(512), torch.randn(300, generator=g), torch.zeros(7)]),
        "tiny": torch.randn(3, generator=g),
        "one": torch.tensor([0.25]),
    }
    for what, x in cases.items():
        x = x - x.mean() if what == "absmax minus its mean" else x
        q, absmax = blockwise_nested(x)
        q_ref, state = bnbf.quantize_blockwise(x, blocksize=256)
        assert torch.equal(q, q_ref), what
        assert torch.equal(absmax, state.absmax), what


AWKWARD = {
    "1x1": (1, 1), "3x5": (3, 5), "very wide": (2, 70000), "tall": (70000, 2), "one block": (1, 64),
    "rows not a multiple of the block": (129, 33), "odd numel": (7, 9),
    "numel/64 not a multiple of 256": (3, 64 * 256 + 64), "many blocks": (640, 320),
}


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "zero rows", "near midpoints", "subnormal"])
@pytest.mark.parametrize("what", list(AWKWARD))
def test_awkward_shapes_give_bitsandbytes_bytes(what, kind):
    g = torch.Generator().manual_seed(zlib.crc32(f"{what} {kind}".encode()))
    shape = AWKWARD[what]
    w = torch.randn(*shape, generator=g) * 0.05
    if kind == "bfloat16":
        w = w.to(torch.bfloat16)
    elif kind == "zero rows":
        w[::3] = 0
        w.view(-1)[-min(w.numel(), 70):] = 0  # also an all-zero last (partial) block
    elif kind == "near midpoints":  # the bfloat16 values around NF4's midpoints, in blocks of absmax 1 or 0.37
        code = nf4_code()
        bits = ((code[:-1] + code[1:]) / 2).to(torch.bfloat16).view(torch.int16)
        grid = torch.cat([bits - 1, bits, bits + 1, code.to(torch.bfloat16).view(torch.int16)]).view(torch.bfloat16)
        w = grid[torch.randint(0, grid.numel(), shape, generator=g)].float()
        w.view(-1)[::64] = 1.0 if shape[0] % 2 else 0.37
    elif kind == "subnormal":
        w = w * 1e-39
    assert_same_bytes(w, what=f"{what} {kind}")


def test_every_bfloat16_value_in_blocks_of_every_absmax():
    # All 65536 bfloat16 bit patterns but NaN/inf, sorted (blocks of neighbours) and shuffled.
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    every = every[every.isfinite()]
    shuffled = every[torch.randperm(every.numel(), generator=torch.Generator().manual_seed(3))]
    for w in (every.sort().values, shuffled):
        assert_same_bytes(w.view(-1, 2), what="every bfloat16")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_same_bytes_at_any_thread_count(threads):
    # 3.1M values: more than 32768 absmax values, so torch's mean (the nested offset) runs on its threads too.
    w = torch.randn(1024, 3072, generator=torch.Generator().manual_seed(4)) * 0.02
    before = torch.get_num_threads()
    with torch_threads(threads):
        assert_same_bytes(w, threads, what=f"{threads} threads")
        assert torch.get_num_threads() == threads  # the workers' single-thread setting stays theirs
    assert torch.get_num_threads() == before


def test_workers_run_torch_kernels_alone_and_leave_the_callers_threads():
    seen: list[tuple[str, int, int, int]] = []
    with torch_threads(3):
        in_chunks(lambda a, b: seen.append((threading.current_thread().name, torch.get_num_threads(), a, b)), 10, 2, 3)
        assert torch.get_num_threads() == 3
    assert sorted((a, b) for _, _, a, b in seen) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert {n for _, n, _, _ in seen} == {1} and all(t.startswith("efexport-encode") for t, *_ in seen)


@pytest.mark.parametrize("strategy", ["dense_lora", "moe_expert_lora", "mixture_lora"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_quantizable_fixture_tensor_gives_bitsandbytes_bytes(run_factory, backbone, strategy):
    run = run_factory(backbone, strategy)
    with open_pipeline(str(run.path)) as pipe:
        names = pipe.quantizable
        planned = [t for t in pipe.target.plan if t.name in names]
        assert len(planned) == len(names) >= 7
        for t in planned:
            assert_same_bytes(t.produce_exact(), what=t.name)


def test_threads_option_keeps_the_bytes_and_restores_torch(run_factory, tmp_path):
    run = run_factory("qwen3", "dense_lora")
    before = torch.get_num_threads()
    files = {}
    for threads in (None, 1):
        out = tmp_path / f"t{threads}"
        export(ExportOptions(run=str(run.path), out=out, precision="int4", verify=False, progress=False,
                             threads=threads))
        assert torch.get_num_threads() == before
        files[threads] = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
        with safe_open(str(out / "model.safetensors"), "pt") as fh:
            assert sum(k.endswith(".quant_state.bitsandbytes__nf4") for k in fh.keys()) >= 7
    assert files[None] == files[1]


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_thread_counts_are_refused_in_three_lines(run_factory, tmp_path, bad):
    run = run_factory("qwen3", "dense_lora")
    with pytest.raises(EfexportError) as err:
        export(ExportOptions(run=str(run.path), out=tmp_path / "x", threads=bad, progress=False))
    assert_three_lines(err.value)
    assert not (tmp_path / "x").exists()
    if isinstance(bad, int) and not isinstance(bad, bool):
        code, _, stderr = run_cli([run.path, "--out", tmp_path / "y", "--threads", bad])
        assert code == 2 and not (tmp_path / "y").exists()
        assert_three_lines(stderr.strip())
