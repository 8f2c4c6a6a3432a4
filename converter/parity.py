"""Parity check: the artifact's logits against the source run in float32.

Probe prompts come from the tokenizer (chat template when it has one), so the check
exercises the same tokens users will send. Both sides run a decoder layer at a time
(:mod:`converter.streaming`), so the check needs one layer's memory, not the model's.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from .streaming import Streamed

PROBES = (
    "What is the capital of South Korea?",
    "Write a haiku about exporting models.",
    "def fibonacci(n):",
    "Translate to French: the weights are ready.",
)


def probe_batches(tokenizer: Any, vocab_size: int, max_len: int = 24) -> list[torch.Tensor]:
    """One [1, T] id tensor per probe prompt (seeded random ids when there is no tokenizer)."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab_size, (1, 12), generator=g) for _ in PROBES]
    out = []
    for text in PROBES:
        if getattr(tokenizer, "chat_template", None):
            try:
                text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                     add_generation_prompt=True)
            except Exception as exc:  # a template made by someone else: any failure, the sandbox's included
                raise template_error(tokenizer, exc) from None
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_len]
        out.append(ids.clamp(max=vocab_size - 1))
    return out


def template_error(tokenizer: Any, exc: Exception) -> Exception:
    """The chat template failed to render for the probes: refused in three lines naming its file.

    Rendered in transformers' sandboxed Jinja environment, so a template that tries to escape
    raises there and nothing it asked for runs; the export stops rather than probe without it.
    """
    from pathlib import Path

    from .errors import fail

    folder = Path(str(getattr(tokenizer, "name_or_path", "") or "."))
    name = next((f for f in ("chat_template.jinja", "chat_template.json") if (folder / f).is_file()),
                "tokenizer_config.json")
    why = " ".join(str(exc).split())[:160]
    return fail(f"render the chat template in {folder.name}/{name} for the parity probes "
                f"({type(exc).__name__}: {why}); the template was not run",
                f"fix or remove the chat template in {folder / name}, or pass --no-verify to export without the "
                "parity check (the template is copied as it is and never run by efexport)",
                "docs: README.md#parity")


@torch.no_grad()
def logits_of(model: torch.nn.Module | Streamed, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Float32 logits per batch, of a whole model or of one streamed a layer at a time."""
    if isinstance(model, Streamed):
        return model.logits(batches)
    device = next(model.parameters()).device
    return [model(input_ids=b.to(device)).logits.float().cpu() for b in batches]


def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor], reference_name: str,
            engine: str | None = None) -> dict[str, Any]:
    diffs = [(r - c).abs().max().item() for r, c in zip(reference, candidate)]
    agree = torch.cat([(r.argmax(-1) == c.argmax(-1)).flatten() for r, c in zip(reference, candidate)])
    scale = max(r.abs().max().item() for r in reference)
    result = {
        "prompts": len(reference),
        "max_abs_logit_diff": max(diffs),
        "max_abs_logit": scale,
        "top1_agreement": agree.float().mean().item(),
        "reference": reference_name,
    }
    if engine:
        result["engine"] = engine
    result["artifact_fingerprint"] = fingerprint(candidate)
    return result


def fingerprint(logits: list[torch.Tensor]) -> dict[str, Any]:
    """What `efexport verify` re-measures later without the source: top-1 ids and |logit| maxima."""
    return {
        "top1": [l.argmax(-1).flatten().tolist() for l in logits],
        "max_abs_logit": [round(l.abs().max().item(), 6) for l in logits],
    }


def same_fingerprint(recorded: dict[str, Any], measured: dict[str, Any]) -> tuple[bool, float, float]:
    """(ok, top-1 agreement, worst relative |logit| max change) between two fingerprints."""
    pairs = [(a, b) for ra, rb in zip(recorded["top1"], measured["top1"]) for a, b in zip(ra, rb)]
    agree = sum(a == b for a, b in pairs) / max(1, len(pairs))
    rel = max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(recorded["max_abs_logit"], measured["max_abs_logit"]))
    return agree >= 0.99 and rel <= 1e-3, agree, rel


# Gates that catch a broken export (a wrong permutation or merge gives rel. diff ~1 and
# random top-1), not rounding: fp32 must match to float error; a half-precision cast may
# flip a near-tied router choice on tiny models, so it is judged by relative diff and top-1.
# Quantized exports are recorded, not gated.
TOLERANCE = {"fp32": (1e-4, 1.0), "fp16": (0.25, 0.8), "bf16": (0.25, 0.8)}


def within_tolerance(parity: dict[str, Any], precision: str | None, source_is_fp32: bool,
                     fp32_rel: float = TOLERANCE["fp32"][0]) -> bool:
    """Gate float exports; anything else (bitsandbytes, GGUF q-types) is recorded, not gated.

    ``fp32_rel``: llama.cpp's fp32 kernels are judged at 1e-3 (its own accumulation order).
    """
    if "skipped" in parity or precision not in (None, "fp32", "fp16", "bf16"):
        return True
    key = precision or ("fp32" if source_is_fp32 else "bf16")
    rel, top1 = (fp32_rel, 1.0) if key == "fp32" else TOLERANCE[key]
    return (parity["max_abs_logit_diff"] <= rel * max(1.0, parity["max_abs_logit"])
            and parity["top1_agreement"] >= top1)


def available_memory() -> int:
    """Bytes of memory available now (Linux MemAvailable; else physical memory)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run_parity(reference: Callable[[], Any], candidate_logits: Callable[[list[torch.Tensor]], list[torch.Tensor]],
               *, unit_bytes: int, reference_name: str = "source run, float32",
               engine: str | None = None) -> dict[str, Any]:
    """Take the reference's logits a layer at a time, then the candidate's; skip (saying why) if a layer cannot fit.

    ``reference()`` is a context manager giving ``(Streamed, tokenizer)``.
    ``candidate_logits(batches)`` runs the artifact however it is read: streamed from its
    files, llama.cpp, or PEFT on the run's base weights. ``unit_bytes``: the largest part
    either side holds at once (one layer, or the embedding / norm + head).
    """
    need = unit_bytes * 1.5
    have = available_memory()
    if need > have:
        return {"skipped": f"needs about {need / 1e9:.1f} GB of memory for one layer or the embedding and head, "
                           f"{have / 1e9:.1f} GB available",
                "reference": reference_name}
    with reference() as (model, tokenizer):
        batches = probe_batches(tokenizer, model.config.get_text_config().vocab_size)
        ref = logits_of(model, batches)
    return compare(ref, candidate_logits(batches), reference_name, engine=engine)
