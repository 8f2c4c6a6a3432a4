"""Chat with a loaded run or an exported artifact (load_model: one call, any folder efexport reads).

    python examples/load_and_chat.py <path> [--precision int4] [--prompt "..."]

The demo run has random weights, so the reply is gibberish: the point is the API.
"""

from __future__ import annotations

import argparse

import torch

from converter import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16", "int8", "int4"])
    parser.add_argument("--prompt", default="What is the capital of South Korea?")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    result = load_model(args.path, load_precision=args.precision)
    messages = [{"role": "user", "content": args.prompt}]
    if getattr(result.tokenizer, "chat_template", None):
        text = result.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = f"[USER]\n{args.prompt}\n\n[ASSISTANT]\n"
    inputs = result.tokenizer(text, return_tensors="pt")
    inputs = {k: v.to(result.model.device) for k, v in inputs.items()}
    torch.manual_seed(0)
    with torch.no_grad():
        outputs = result.model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=True,
                                        temperature=0.7, pad_token_id=result.tokenizer.eos_token_id)
    input_len = inputs["input_ids"].shape[1]
    response = result.tokenizer.decode(outputs[0][input_len:], skip_special_tokens=True).strip()
    print(f"Prompt: {args.prompt}")
    print(f"Response: {response}")


if __name__ == "__main__":
    main()
