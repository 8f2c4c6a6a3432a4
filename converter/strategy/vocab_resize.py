"""A PEFT adapter trained with added tokens: its resized vocabulary, embedding tensors and trainable tokens.

PEFT asks the user to resize the base first (``model.resize_token_embeddings(
len(tokenizer))``) and then ``PeftModel.from_pretrained``; the merge reproduces that
model. Rows the adapter carries (``modules_to_save``, the embedding layers PEFT saves
when it sees a resized vocabulary, trainable-token rows) are taken from it; rows it does
not carry are what transformers' resize leaves: the first rows of the base, and new rows
at the mean of the old ones. (``mean_resizing=True``, transformers' default, samples them
from a normal distribution around that mean with the old rows' covariance scaled by 1e-9:
each value lies about 3e-5 standard deviations from the mean, differently on every run,
and exactly on it when that covariance is not positive definite; efexport writes the mean.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import fail
from ..source.peft_adapter import SEE_ADAPTERS
from ..source.safetensors import TensorSource
from ..source.vocab import check_resize, tokenizer_length

# PEFT's names for embedding tensors an adapter saves besides LoRA factors (after base_model.model.):
#   X.modules_to_save.weight             the trained copy of a modules_to_save layer (X.weight holds the same)
#   X.original_module.weight             the frozen original kept beside it, never part of the merged model
#   X.token_adapter.base_layer.weight    the (resized) layer under trainable tokens
#   X.token_adapter.trainable_tokens_delta  the trained rows of trainable_token_indices (values, not a delta)
SAVED_FORMS = ((".modules_to_save.", "."), (".token_adapter.base_layer.", ".base_layer."))
DROPPED = ".original_module."
TOKEN_DELTA = re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta$")


def planner_name(name: str) -> str | None:
    """The name the merge planner reads for one adapter tensor (None: not part of the merged model)."""
    if DROPPED in name:
        return None
    for old, new in SAVED_FORMS:
        name = name.replace(old, new)
    return name


@dataclass(frozen=True)
class TokenRows:
    """trainable_token_indices of one module: the rows PEFT overwrites with the adapter's values."""

    module: str
    delta: str  # adapter tensor [len(indices), dim]
    indices: tuple[int, ...]


def _bad(why: str, fix: str) -> Exception:
    return fail(f"merge the PEFT adapter: {why}", fix, SEE_ADAPTERS)


def token_rows(cfg: dict[str, Any], deltas: dict[str, str], layout: Any, adapter: TensorSource) -> list[TokenRows]:
    """``trainable_token_indices`` (a list for the input embedding, or {module: list}) matched to saved rows."""
    spec = cfg.get("trainable_token_indices")
    if not spec:
        if deltas:
            raise _bad(f"it has trainable-token rows for {next(iter(deltas))} but adapter_config.json has no "
                       "trainable_token_indices", "repair adapter_config.json (as PEFT saved it).")
        return []
    wanted = dict(spec) if isinstance(spec, dict) else {layout.input_embedding or "embed_tokens": list(spec)}
    tied = (layout.output_embedding and layout.input_embedding and layout.alias.get(f"{layout.output_embedding}.weight")
            == layout.alias.get(f"{layout.input_embedding}.weight"))
    out: list[TokenRows] = []
    for module, full in deltas.items():
        key = next((k for k in wanted if module.endswith(k)), None)
        if key is None and tied and module == layout.output_embedding:  # PEFT ties the head to the embedding's rows
            key = next((k for k in wanted if (layout.input_embedding or "").endswith(k)), None)
        if key is None:
            raise _bad(f"it has trainable-token rows for {module}, which trainable_token_indices does not select",
                       "repair trainable_token_indices in adapter_config.json (as PEFT saved it).")
        indices = tuple(int(i) for i in wanted[key])
        shape = tuple(adapter.shape(full))
        if len(shape) != 2 or shape[0] != len(indices) or len(set(indices)) != len(indices):
            raise _bad(f"{module}'s trainable-token rows have shape {list(shape)} for {len(indices)} "
                       f"trainable_token_indices", "re-save the adapter with PEFT's save_pretrained().")
        out.append(TokenRows(module, full, indices))
    covered = {k for k in wanted if any(t.module.endswith(k) for t in out)}
    if set(wanted) - covered:
        raise _bad(f"adapter_config.json's trainable_token_indices select {sorted(set(wanted) - covered)[0]} but the "
                   "adapter has no trainable-token rows for it", "re-save the adapter with PEFT's save_pretrained().")
    return out


@dataclass(frozen=True)
class Vocab:
    """The merged model's vocabulary: ``size`` rows, resized from ``base_size`` when they differ."""

    base_size: int
    size: int
    names: frozenset[str]  # base tensors with one row per token (embedding, head, head bias)

    @property
    def resized(self) -> bool:
        return self.size != self.base_size


def plan_vocab(layout: Any, base: TensorSource, adapter: TensorSource, canonical: Callable[[str], str],
               plain: dict[str, list[str]], lora_parts: dict[str, dict[str, str]], tokens: list[TokenRows],
               tokenizer: Path | None) -> Vocab:
    """How many rows the merged embedding has, from what the adapter carries and its tokenizer."""
    emb = layout.input_embedding
    if not emb or canonical(f"{emb}.weight") not in base.infos:
        return Vocab(0, 0, frozenset())
    first = canonical(f"{emb}.weight")
    old = int(base.shape(first)[0])
    names = {canonical(f"{m}.{p}") for m in (emb, layout.output_embedding) if m for p in ("weight", "bias")}
    names = {n for n in names if n in base.infos and base.shape(n)[:1] == (old,)}
    rows: dict[str, int] = {}  # adapter tensor -> the vocabulary size it implies
    for name, fulls in plain.items():
        if canonical(name) in names:
            rows[fulls[-1]] = int(adapter.shape(fulls[-1])[0])
    a = (lora_parts.get(emb) or {}).get("lora_embedding_A")
    if a is not None and len(adapter.shape(a)) == 2:
        rows[a] = int(adapter.shape(a)[1])
    sizes = sorted(set(rows.values()))
    if len(sizes) > 1:
        detail = ", ".join(f"{n} {r}" for n, r in list(rows.items())[:3])
        raise _bad(f"its embedding tensors disagree on the vocabulary size ({detail})",
                   "re-save the adapter with PEFT's save_pretrained() after one resize_token_embeddings().")
    top = max((max(t.indices) + 1 for t in tokens if t.indices), default=0)
    where = f"the base's {first}"
    if sizes and sizes[0] != old:
        size = sizes[0]
        check_resize(size, old, f"the adapter's {next(iter(rows))}", where, tokenizer, SEE_ADAPTERS,
                     action="merge the PEFT adapter", beside="next to adapter_config.json")
    elif top > old:  # trainable tokens past the base's rows, and no saved embedding: resized to len(tokenizer)
        size = (tokenizer_length(tokenizer) if tokenizer is not None else None) or 0
        if size < top:
            found = f"a tokenizer of {size} tokens in {tokenizer.name}/" if size and tokenizer else "no tokenizer"
            raise _bad(f"its trainable_token_indices need a vocabulary of at least {top} rows, past the {old} rows of "
                       f"{where}, and {found} does not reach that far",
                       f"found trainable tokens up to row {top - 1} and {found}: save the tokenizer the adapter was "
                       "trained with (tokenizer.save_pretrained) next to adapter_config.json.")
    else:
        size = old
    if top > size:
        raise _bad(f"trainable_token_indices reach row {top - 1} but the vocabulary has {size} rows",
                   "repair trainable_token_indices in adapter_config.json (as PEFT saved it).")
    return Vocab(old, size, frozenset(names))


def resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with ``rows`` rows as transformers' resize leaves it: old rows kept, new rows the old rows' mean."""
    old = t.shape[0]
    if rows <= old:
        return t[:rows]
    mean = t.to(torch.float32).mean(dim=0, keepdim=True)
    return torch.cat([t, mean.expand(rows - old, *t.shape[1:]).to(t.dtype)])


def overwrite_rows(t: torch.Tensor, indices: tuple[int, ...], values: torch.Tensor) -> torch.Tensor:
    """PEFT's trainable-token merge: ``W.index_copy(0, indices, values)``."""
    return t.index_copy(0, torch.tensor(indices, dtype=torch.long), values.to(t.dtype))
