"""Batch generation with a loaded run.

    python examples/load_batch_inference.py <path> [--precision bf16]
"""

from __future__ import annotations

import argparse

import torch

from converter import load_model

PROMPTS = [
    "What is the capital of South Korea?",
    "Name three prime numbers.",
    "Say hello in French.",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16", "int8", "int4"])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    result = load_model(args.path, load_precision=args.precision)
    tok = result.tokenizer
    tok.padding_side = "left"  # decoder-only models generate after the prompt
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             if getattr(tok, "chat_template", None) else p for p in PROMPTS]
    batch = tok(texts, return_tensors="pt", padding=True).to(result.model.device)
    with torch.no_grad():
        out = result.model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id)
    for i, prompt in enumerate(PROMPTS, 1):
        reply = tok.decode(out[i - 1][batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        print(f"[{i}] {prompt} -> {reply!r}")


if __name__ == "__main__":
    main()
