"""The measured non-efexport paths, one per subprocess (run by bench_export.py).

    python benchmarks/baselines.py peft-merge --base B --adapter A --out O [--max-shard-size 1GB]
        AutoModelForCausalLM.from_pretrained(B, dtype=bfloat16) + PeftModel.from_pretrained(A)
        + merge_and_unload() + save_pretrained(O)
    python benchmarks/baselines.py tf-int4 --model M --out O [--max-shard-size 1GB]
        from_pretrained(M, quantization_config=BitsAndBytesConfig(nf4, double quant, bf16 compute))
    python benchmarks/baselines.py tf-int8 ...   (the same with BitsAndBytesConfig(load_in_8bit=True))
        + save_pretrained(O)
    python benchmarks/baselines.py from-pretrained DIR       AutoModelForCausalLM.from_pretrained(DIR)
    python benchmarks/baselines.py convert-gguf --llama-cpp L --pre qwen2 MODEL --outtype q8_0 --outfile F
        llama.cpp's own convert_hf_to_gguf.py (from L, the llama.cpp tree of the llama-cpp-python
        sdist), run in-process with one patch: a BPE pre-tokenizer whose check-text hash it does
        not know gets --pre instead of an error (the synthetic tokenizer is not a real Qwen
        vocabulary; efexport identifies it by its exact configuration as qwen2)
    python benchmarks/baselines.py quantize-gguf SRC DST q4_k_m    llama_cpp.llama_model_quantize
    python benchmarks/baselines.py load-artifact DIR [--no-verify]   converter.load_artifact(DIR)

Each prints one JSON line: the seconds of each phase inside the process (imports
excluded from the phases, included in the process wall time the harness measures).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

T0 = time.perf_counter()


def _quiet() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def peft_merge(args) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _quiet()
    phases = {"import": time.perf_counter() - T0}
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.bfloat16)
    phases["load_base"] = time.perf_counter() - t
    t = time.perf_counter()
    model = PeftModel.from_pretrained(model, args.adapter)
    phases["load_adapter"] = time.perf_counter() - t
    t = time.perf_counter()
    model = model.merge_and_unload()
    phases["merge"] = time.perf_counter() - t
    t = time.perf_counter()
    model.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    if args.with_tokenizer:  # what a user does before convert_hf_to_gguf.py, which needs the tokenizer
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(args.base).save_pretrained(args.out)
    phases["save"] = time.perf_counter() - t
    return phases


def convert_gguf(args) -> dict:
    import sys

    sys.path.insert(0, str(args.llama_cpp))
    sys.argv = ["convert_hf_to_gguf.py", args.model, "--outtype", args.outtype, "--outfile", args.outfile]
    import convert_hf_to_gguf
    from conversion import base

    phases = {"import": time.perf_counter() - T0}
    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return args.pre

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    t = time.perf_counter()
    convert_hf_to_gguf.main()
    phases["convert"] = time.perf_counter() - t
    return phases


def quantize_gguf(args) -> dict:
    import llama_cpp

    phases = {"import": time.perf_counter() - T0}
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
                    "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K}[args.type]
    params.nthread = os.cpu_count() or 1  # as efexport calls it
    t = time.perf_counter()
    if llama_cpp.llama_model_quantize(args.src.encode(), args.dst.encode(), params) != 0:
        raise SystemExit("llama_model_quantize failed")
    phases["quantize"] = time.perf_counter() - t
    return phases


def tf_int4(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _quiet()
    phases = {"import": time.perf_counter() - T0}
    if args.cmd == "tf-int8":
        qc = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=qc, device_map="cpu")
    phases["load_quantize"] = time.perf_counter() - t
    t = time.perf_counter()
    model.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    phases["save"] = time.perf_counter() - t
    return phases


def _quantized(folder: str) -> bool:
    with open(os.path.join(folder, "config.json")) as fh:
        return "quantization_config" in json.load(fh)


def from_pretrained(args) -> dict:
    from transformers import AutoModelForCausalLM

    _quiet()
    phases = {"import": time.perf_counter() - T0}
    # The same call load_artifact makes for dense artifacts (dtype as stored; device_map for bnb).
    kwargs = {"dtype": "auto"}
    if _quantized(args.dir):
        kwargs["device_map"] = "cpu"
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.dir, **kwargs).eval()
    phases["load"] = time.perf_counter() - t
    phases["params"] = sum(p.numel() for p in model.parameters())
    return phases


def load_artifact(args) -> dict:
    from converter.runtime import load_artifact as _load

    _quiet()
    phases = {"import": time.perf_counter() - T0}
    t = time.perf_counter()
    loaded = _load(args.dir, device="cpu", verify=not args.no_verify)
    phases["load"] = time.perf_counter() - t
    phases["params"] = sum(p.numel() for p in loaded.model.parameters())
    return phases


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("peft-merge")
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-shard-size", default="1GB")
    p.add_argument("--with-tokenizer", action="store_true", help="also save the base model's tokenizer")
    p = sub.add_parser("convert-gguf")
    p.add_argument("--llama-cpp", required=True, help="llama.cpp source tree holding convert_hf_to_gguf.py")
    p.add_argument("--pre", required=True, help="tokenizer.ggml.pre for a check-text hash it does not know")
    p.add_argument("model")
    p.add_argument("--outtype", required=True)
    p.add_argument("--outfile", required=True)
    p = sub.add_parser("quantize-gguf")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("type", choices=["q4_k_m", "q5_k_m", "q6_k"])
    for name in ("tf-int4", "tf-int8"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--max-shard-size", default="1GB")
    p = sub.add_parser("from-pretrained")
    p.add_argument("dir")
    p = sub.add_parser("load-artifact")
    p.add_argument("dir")
    p.add_argument("--no-verify", action="store_true")
    args = ap.parse_args()
    fn = {"peft-merge": peft_merge, "tf-int4": tf_int4, "tf-int8": tf_int4, "from-pretrained": from_pretrained,
          "load-artifact": load_artifact, "convert-gguf": convert_gguf, "quantize-gguf": quantize_gguf}[args.cmd]
    phases = fn(args)
    print(json.dumps({"phases": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in phases.items()}}))


if __name__ == "__main__":
    main()
