"""Synthetic, Qwen3-shaped EulerForge runs for the export benchmarks (no downloads).

``python benchmarks/make_synthetic_run.py --size 0.6b --out DIR`` writes, under DIR:

    run/                      an EulerForge run (run-format.md §1-3), strategy dense_lora
      resolved_config.json
      final/                  config.json (+ "eulerforge" block), sharded bf16 safetensors
                              (model-0000k-of-0000n.safetensors + index, ~1 GB each),
                              tokenizer, generation_config.json
    base/                     the same frozen weights W0 as a plain Hugging Face folder
    adapter/                  the same LoRA factors as a PEFT adapter (adapter_config.json +
                              adapter_model.safetensors), base_model_name_or_path -> base/

so ``efexport run`` and ``PeftModel.from_pretrained(base, adapter).merge_and_unload()``
compute the same merged model. LoRA is r=16, alpha=32 on q, k, v, o, gate, up and down.

Weights are seeded random bfloat16, generated tensor by tensor in row chunks (each chunk
seeded from the tensor's Hugging Face name, so ``base/`` and ``run/`` hold bit-identical
W0) and streamed straight into the shard files: the generator's own memory stays at a
few tens of MB whatever the model size.

Sizes: ``tiny`` (hidden 64, 2 layers: a smoke run in seconds), ``0.6b`` (Qwen3-0.6B:
hidden 1024, 28 layers, intermediate 3072, vocab 151936) and ``1.7b`` (Qwen3-1.7B:
hidden 2048, 28 layers, intermediate 6144). Both real Qwen3 sizes tie lm_head to the
embedding, and so do these.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]

SIZES: dict[str, dict] = {
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "1.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    # Qwen3-8B's shape (untied head, as that model has): ~16 GB of bfloat16; made with --run-only
    "8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128),
}
TIED = {"tiny": True, "0.6b": True, "1.7b": True, "8b": False}
# Shard size of the synthetic checkpoints (and the --max-shard-size the benchmarks ask for).
SHARD_SIZE = {"tiny": "200KB", "0.6b": "1GB", "1.7b": "1GB", "8b": "4GB"}
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA = 16, 32.0
HF_NAME = {"tiny": "Qwen/Qwen3-0.6B", "0.6b": "Qwen/Qwen3-0.6B", "1.7b": "Qwen/Qwen3-1.7B", "8b": "Qwen/Qwen3-8B"}
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2  # the test fixture tokenizer's ids
CHUNK_ELEMS = 4 * 1024 * 1024  # rows generated per step: <= 16 MB of float32


def parse_size(text: str) -> int:
    """'1GB' -> 10**9, '200KB' -> 200_000 (decimal, like Hugging Face's max_shard_size)."""
    text = text.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


# --------------------------------------------------------------------------- config
def hf_config(size: str) -> dict:
    from transformers import Qwen3Config

    cfg = Qwen3Config(
        **SIZES[size],
        hidden_act="silu",
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        attention_bias=False,
        tie_word_embeddings=TIED[size],
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    d = cfg.to_dict()
    d["architectures"] = ["Qwen3ForCausalLM"]
    d["dtype"] = "bfloat16"
    return d


def injection_block() -> dict:
    return {"strategy": "dense_lora", "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.05,
            "use_rslora": False, "target_modules": list(TARGET_MODULES), "num_experts": 4, "top_k": 2,
            "moe_layers": None}


def base_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every persistent tensor Qwen3ForCausalLM saves, in module order
    (the test fixtures' own reading of a meta-device model)."""
    return list(_fixture_runs().state_dict_shapes(json.dumps(config, sort_keys=True)))


# --------------------------------------------------------------------------- weights
class Spec:
    """One tensor to write: name, shape, and how its values are drawn (std, mean)."""

    def __init__(self, name: str, shape: tuple[int, ...], seed_key: str, std: float, mean: float = 0.0) -> None:
        self.name, self.shape, self.seed_key, self.std, self.mean = name, shape, seed_key, std, mean

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * 2  # bfloat16

    def chunks(self, seed: int) -> Iterator[bytes]:
        """bf16 bytes, row chunk by row chunk; chunk i is seeded from (seed, seed_key, i)."""
        import torch

        rows = self.shape[0]
        cols = math.prod(self.shape[1:]) if len(self.shape) > 1 else 1
        step = max(1, CHUNK_ELEMS // cols)
        for i, start in enumerate(range(0, rows, step)):
            n = min(step, rows - start)
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{self.seed_key}:{i}".encode()))
            t = torch.randn(n * cols, generator=g, dtype=torch.float32)
            t.mul_(self.std).add_(self.mean)
            yield t.to(torch.bfloat16).view(torch.uint8).numpy().tobytes()


def base_spec(name: str, shape: tuple[int, ...], out_name: str | None = None) -> Spec:
    """W0 (and every other backbone tensor): Linear ~ N(0, 1/in), norms ~ 1 + N(0, 0.1^2),
    embedding (tied with lm_head) ~ N(0, 0.25^2) so logits are O(10) with clear top-1 gaps."""
    if name.endswith("norm.weight"):
        return Spec(out_name or name, shape, name, 0.1, 1.0)
    if name == "model.embed_tokens.weight":
        return Spec(out_name or name, shape, name, 0.25)
    if len(shape) == 2:
        return Spec(out_name or name, shape, name, 1.0 / math.sqrt(shape[1]))
    return Spec(out_name or name, shape, name, 0.02)


def lora_specs(module: str, out_f: int, in_f: int, prefix: str = "") -> list[Spec]:
    """A ~ N(0, 1/in), B sized so that s·B@A moves W by ~30% of W0's own scale."""
    s = LORA_ALPHA / LORA_R
    b_std = 0.3 / (s * math.sqrt(LORA_R))
    return [
        Spec(f"{prefix}{module}.lora_A.weight", (LORA_R, in_f), f"{module}.lora_A", 1.0 / math.sqrt(in_f)),
        Spec(f"{prefix}{module}.lora_B.weight", (out_f, LORA_R), f"{module}.lora_B", b_std),
    ]


def is_target(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and name.startswith("model.layers.") and parts[-1] == "weight" and parts[-2] in TARGET_MODULES


def run_specs(shapes: list[tuple[str, tuple[int, ...]]]) -> list[Spec]:
    out: list[Spec] = []
    for name, shape in shapes:
        if is_target(name):
            module = name[: -len(".weight")]
            out.append(base_spec(name, shape, f"{module}.base_layer.weight"))
            out.extend(lora_specs(module, shape[0], shape[1]))
        else:
            out.append(base_spec(name, shape))
    return out


def adapter_specs(shapes: list[tuple[str, tuple[int, ...]]]) -> list[Spec]:
    out: list[Spec] = []
    for name, shape in shapes:
        if is_target(name):
            out.extend(lora_specs(name[: -len(".weight")], shape[0], shape[1], prefix="base_model.model."))
    return out


# --------------------------------------------------------------------------- writing
def _header(specs: list[Spec]) -> bytes:
    header, offset = {}, 0
    for s in specs:
        header[s.name] = {"dtype": "BF16", "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8)


def write_safetensors_streaming(path: Path, specs: list[Spec], seed: int) -> int:
    blob = _header(specs)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for s in specs:
            for chunk in s.chunks(seed):
                fh.write(chunk)
    return sum(s.nbytes for s in specs)


def write_sharded(folder: Path, specs: list[Spec], seed: int, max_shard: int, stem: str = "model") -> None:
    """Greedy shards of at most ``max_shard`` bytes, named and indexed as save_pretrained does."""
    from converter.sinks.safetensors import split_shards  # the exporter's own rule (anything with .nbytes)

    shards = split_shards(specs, max_shard)
    if len(shards) == 1:
        write_safetensors_streaming(folder / f"{stem}.safetensors", shards[0], seed)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        fname = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors_streaming(folder / fname, shard, seed)
        weight_map.update({s.name: fname for s in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _fixture_runs():
    """tests/fixtures/runs.py: the synthetic runs reuse the test fixtures' tokenizer and shapes."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from fixtures import runs
    finally:
        sys.path.pop(0)
    return runs


def write_tokenizer(folder: Path) -> None:
    _fixture_runs().write_tokenizer(folder)


def _json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def generation_config() -> dict:
    import transformers

    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "do_sample": False,
            "transformers_version": transformers.__version__}


def make(size: str, out: Path, seed: int = 0, max_shard_size: str | None = None,
         log: Callable[[str], None] = print, run_only: bool = False) -> dict[str, Path]:
    """Write run/, base/ and adapter/ under ``out`` (only run/ with ``run_only``); returns their paths."""
    out = Path(out)
    max_shard = parse_size(max_shard_size or SHARD_SIZE[size])
    config = hf_config(size)
    shapes = base_shapes(config)
    block = injection_block()
    run, ckpt, base, adapter = out / "run", out / "run" / "final", out / "base", out / "adapter"
    for d in (ckpt, base, adapter):
        d.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    _json(ckpt / "config.json", {**config, "eulerforge": dict(block)})
    write_sharded(ckpt, run_specs(shapes), seed, max_shard)
    write_tokenizer(ckpt)
    _json(ckpt / "generation_config.json", generation_config())
    _json(run / "resolved_config.json", {
        "backbone": "qwen3",
        "model": {"name_or_path": HF_NAME[size], "dtype": "bfloat16"},
        "injection": dict(block),
        "training": {"learning_rate": 0.0002, "epochs": 1, "seed": seed, "dataset": "synthetic"},
        "run_name": f"bench_{size}",
    })
    log(f"  run/      {_du(run) / 1e9:.2f} GB in {time.time() - t0:.1f}s")
    if run_only:
        base.rmdir(), adapter.rmdir()
        return {"run": run, "checkpoint": ckpt}

    t0 = time.time()
    _json(base / "config.json", config)
    write_sharded(base, [base_spec(n, s) for n, s in shapes], seed, max_shard)
    write_tokenizer(base)
    _json(base / "generation_config.json", generation_config())
    log(f"  base/     {_du(base) / 1e9:.2f} GB in {time.time() - t0:.1f}s")

    t0 = time.time()
    write_safetensors_streaming(adapter / "adapter_model.safetensors", adapter_specs(shapes), seed)
    _json(adapter / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base.resolve()),
        "r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.05, "use_rslora": False,
        "target_modules": list(TARGET_MODULES), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
    })
    log(f"  adapter/  {_du(adapter) / 1e6:.1f} MB in {time.time() - t0:.1f}s")
    return {"run": run, "checkpoint": ckpt, "base": base, "adapter": adapter}


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), required=True)
    ap.add_argument("--out", type=Path, required=True, help="folder to write run/, base/ and adapter/ into")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-size", default=None, help="default: 1GB (200KB for tiny)")
    ap.add_argument("--run-only", action="store_true", help="only run/ (no base model and adapter for the baselines)")
    args = ap.parse_args()
    paths = make(args.size, args.out, args.seed, args.max_shard_size, run_only=args.run_only)
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
