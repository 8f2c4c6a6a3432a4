"""A PEFT adapter merged exactly as PEFT's ``merge_and_unload()`` computes it, planned from headers.

Per-module scale (``rank_pattern`` / ``alpha_pattern`` / rsLoRA), ``fan_in_fan_out`` (Conv1D
layouts), embedding LoRA, ``lora_bias``, DoRA magnitudes, ``modules_to_save`` and trained
biases replacing whole tensors, trainable tokens, tied embeddings, a vocabulary resized for
added tokens (:mod:`.vocab_resize`): each final tensor is a recipe (a start tensor and ops)
computed in float32 and rounded once. The result is a
:class:`~converter.strategy.reader.Reader` over the final Hugging Face names, so the
pipeline streams it like any other source.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import fail
from ..source.peft_adapter import SEE_ADAPTERS, AdapterSource
from ..source.run_dir import ResolvedRun
from ..source.safetensors import TensorSource
from ..source.vocab import tokenizer_dir
from .injection import Injection
from .lora import merge_lora_f32
from .peft_rules import LORA_PART, PEFT_MARKERS, PEFT_PREFIX, check_adapter_config, match_target, model_layout, module_scale
from .reader import Reader
from .vocab_resize import TOKEN_DELTA, Vocab, overwrite_rows, plan_vocab, planner_name, resize_rows, token_rows

# --------------------------------------------------------------------------- the merge, as pure functions


def merge_dora_f32(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, magnitude: torch.Tensor,
                   norm_dim: int = 1) -> torch.Tensor:
    """PEFT's merged DoRA weight, in float32.

    ``V = W0 + s·(B @ A)`` (via :func:`merge_lora_f32`), then ``W = (m / ‖V‖) · V`` where the
    norm runs over ``norm_dim`` (dim 1, per output row, for a Linear ``[out, in]``; dim 0 for
    Conv1D ``[in, out]`` and for an embedding ``[vocab, dim]``, whose magnitude is per column).
    """
    v = merge_lora_f32(w0, a, b, scale)
    norm = torch.linalg.norm(v, dim=norm_dim, keepdim=True)
    return (magnitude.to(torch.float32).reshape(norm.shape) / norm) * v


def merge_dora(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, magnitude: torch.Tensor,
               norm_dim: int = 1) -> torch.Tensor:
    """:func:`merge_dora_f32` cast back to W0's dtype."""
    return merge_dora_f32(w0, a, b, scale, magnitude, norm_dim).to(w0.dtype)


def add_lora_bias_f32(bias: torch.Tensor, lora_b_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """``lora_bias``: bias + s · lora_B.bias, in float32."""
    return bias.to(torch.float32) + scale * lora_b_bias.to(torch.float32)


@dataclass
class _Op:
    """One adapter module's change to one tensor, applied in the base model's module order."""

    module: str
    kind: str  # lora | dora | bias | tokens
    parts: dict[str, str]  # role -> adapter tensor name
    scale: float
    transposed: bool = False  # delta = (B @ A).T: embeddings and Conv1D (fan_in_fan_out)
    norm_dim: int = 1
    indices: tuple[int, ...] = ()  # tokens: the rows trainable_token_indices overwrites

    def apply_f32(self, t: torch.Tensor, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        if self.kind == "bias":
            return add_lora_bias_f32(t, get(self.parts["bias"]), self.scale)
        if self.kind == "tokens":
            return overwrite_rows(t, self.indices, get(self.parts["delta"]))
        a, b = get(self.parts["A"]), get(self.parts["B"])
        if self.transposed:  # W0 + s·(B @ A).T == W0 + s·(A.T @ B.T)
            a, b = b.t(), a.t()
        if self.kind == "dora":
            return merge_dora_f32(t, a, b, self.scale, get(self.parts["magnitude"]), self.norm_dim)
        return merge_lora_f32(t, a, b, self.scale)


@dataclass
class _Output:
    """How one final tensor is made: a start (base tensor or adapter replacement) and ops."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: tuple[str, str]  # ("base" | "adapter" | "resized", tensor name)
    ops: list[_Op] = field(default_factory=list)


@dataclass
class AdapterMerge:
    """The header-level plan of a PEFT adapter merge."""

    cfg: dict[str, Any]
    outputs: dict[str, _Output]  # final name -> recipe, in output order
    injection: Injection
    config_updates: dict[str, Any]
    modules: dict[str, str]  # LoRA module -> kind (lora | dora)
    replaced: list[str]  # final names replaced wholesale by the adapter (modules_to_save, trained biases)
    vocab: Vocab | None = None


def _strip(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _bad(why: str, fix: str = "the adapter does not match its base model; pass --base-model with the model it was "
                              "trained on.") -> Exception:
    return fail(f"merge the PEFT adapter: {why}", fix, SEE_ADAPTERS)


def plan_adapter_merge(cfg: dict[str, Any], base_config: dict[str, Any], base: TensorSource,
                       adapter: TensorSource, tokenizer: Path | None = None) -> AdapterMerge:
    """Plan every merged tensor from names, shapes and the base's module classes (no tensor data).

    ``tokenizer``: the adapter's tokenizer folder, which must explain a resized vocabulary.
    """
    layout = model_layout(base_config)
    base_names = list(base.names)
    base_set = set(base_names)
    leftovers = [n for n in base_names if PEFT_MARKERS.search(n) or ".base_layer." in n]
    if leftovers:
        raise _bad(f"the base model still holds adapter tensors (e.g. {leftovers[0]})",
                   "pass --base-model with a plain Hugging Face model folder (merge or export the base first).")

    # Tied parameters: every alias -> the member the base checkpoint stores.
    groups: dict[str, list[str]] = {}
    for p, first in layout.alias.items():
        groups.setdefault(first, []).append(p)
    stored: dict[str, str] = {}
    tie_group: dict[str, list[str]] = {}
    for members in groups.values():
        keep = next((m for m in members if m in base_set), members[0])
        for m in members:
            stored[m] = keep
        if len(members) > 1:
            tie_group[keep] = members

    def canonical(name: str) -> str:
        return name if name in base_set else stored.get(name, name)

    # 1. sort the adapter's tensors: LoRA parts per module, and whole base-named tensors
    modules: dict[str, dict[str, str]] = {}
    plain: dict[str, list[str]] = {}  # base name -> adapter tensor names
    deltas: dict[str, str] = {}  # module -> its trainable-token rows
    for full in adapter.names:
        name = planner_name(_strip(full))
        if name is None:  # PEFT's frozen original beside a modules_to_save copy
            continue
        m = LORA_PART.match(name)
        if t := TOKEN_DELTA.match(name):
            deltas[t.group("module")] = full
        elif m:
            part = m.group("part")
            if part.startswith("lora_magnitude_vector"):
                part = "lora_magnitude_vector"
            modules.setdefault(m.group("module"), {})[part] = full
        elif PEFT_MARKERS.search(name):
            raise _bad(f"tensor {full!r} is not a LoRA, DoRA or whole-module tensor efexport knows how to merge",
                       "merge this adapter with PEFT's merge_and_unload() and export the merged model folder.")
        else:
            plain.setdefault(name.replace(".base_layer.", "."), []).append(full)

    tokens = token_rows(cfg, deltas, layout, adapter)
    vocab = plan_vocab(layout, base, adapter, canonical, plain, modules, tokens, tokenizer)
    outputs: dict[str, _Output] = {n: _Output(n, base.shape(n), base.dtype(n), ("base", n)) for n in base_names}
    for n in vocab.names if vocab.resized else ():  # transformers' resize_token_embeddings, as PEFT requires
        outputs[n] = _Output(n, (vocab.size, *base.shape(n)[1:]), base.dtype(n), ("resized", n))
    replaced: list[str] = []

    # 2. whole tensors saved with the adapter: modules_to_save, trained biases (bias="all"/"lora_only"),
    #    and base layers PEFT saves next to a targeted embedding.
    untie: dict[str, dict[str, str]] = {}  # stored name -> {alias: adapter tensor}
    for name, fulls in plain.items():
        target = canonical(name)
        if target not in base_set:
            raise _bad(f"adapter tensor {fulls[0]!r} has no counterpart {name!r} in the base model")
        shape, want = tuple(adapter.shape(fulls[-1])), tuple(outputs[target].shape)
        if shape != want:
            raise _bad(f"adapter tensor {fulls[-1]!r} has shape {list(shape)} but the base's {target} has "
                       f"{list(want)}{' (after the vocabulary resize)' if vocab.resized else ''}")
        whole_module = any(".base_layer." not in _strip(f) for f in fulls)
        if whole_module and target in tie_group:
            untie.setdefault(target, {})[name] = fulls[-1]
            continue
        outputs[target].start = ("adapter", fulls[-1])
        replaced.append(target)

    config_updates: dict[str, Any] = {}
    embeddings = {f"{m}.weight" for m in (layout.input_embedding, layout.output_embedding) if m}
    for target, chosen in untie.items():
        members = tie_group[target]
        if cfg.get("ensure_weight_tying"):  # PEFT keeps one replacement for both tied modules
            outputs[target].start = ("adapter", chosen.get(target) or next(iter(chosen.values())))
            replaced.append(target)
            continue
        if set(members) != embeddings:
            raise _bad(f"modules_to_save replaces {', '.join(chosen)}, which shares its weights with "
                       f"{', '.join(sorted(set(members) - set(chosen)))} in the base model",
                       "merge this adapter with PEFT's merge_and_unload() and export the merged model folder.")
        # PEFT's merged model keeps the replacement and the original module apart: untied embeddings.
        for member in sorted(members, key=lambda m: m != target):
            if member not in outputs:
                outputs[member] = _Output(member, outputs[target].shape, base.dtype(target),
                                          ("resized" if vocab.resized else "base", target))
            if member in chosen:
                outputs[member].start = ("adapter", chosen[member])
                replaced.append(member)
        config_updates["tie_word_embeddings"] = False

    # 3. LoRA / DoRA modules, in the base model's module order (the order merge_and_unload merges them in)
    targets = cfg.get("target_modules")
    use_dora = bool(cfg.get("use_dora"))
    lora_modules: dict[str, str] = {}
    order = {name: i for i, name in enumerate(layout.kinds)}
    for module in sorted(modules, key=lambda m: order.get(m, len(order))):
        parts = modules[module]
        kind = layout.kinds.get(module)
        if kind is None:
            raise _bad(f"it has LoRA weights for {module!r}, a module the base model does not have")
        if kind not in ("linear", "conv1d", "embedding"):
            raise _bad(f"{module!r} is not a Linear, Conv1D or Embedding layer; efexport merges LoRA on those only",
                       "merge this adapter with PEFT's merge_and_unload() and export the merged model folder.")
        tied_to_targeted_embedding = (  # ensure_weight_tying: PEFT gives lm_head the embedding's tied adapter
            bool(cfg.get("ensure_weight_tying")) and layout.input_embedding in modules
            and module != layout.input_embedding
            and canonical(f"{module}.weight") == canonical(f"{layout.input_embedding}.weight"))
        if targets is not None and not match_target(cfg, module, layout) and not tied_to_targeted_embedding:
            raise _bad(f"it has LoRA weights for {module!r} but adapter_config.json's target_modules / "
                       "layers_to_transform / exclude_modules do not select that module (PEFT would drop them)",
                       "fix target_modules in adapter_config.json to match the saved weights.")
        r, _, scale = module_scale(cfg, module)
        a_key, b_key = (("lora_embedding_A", "lora_embedding_B") if kind == "embedding"
                        else ("lora_A.weight", "lora_B.weight"))
        if a_key not in parts or b_key not in parts:
            raise _bad(f"module {module!r} has {', '.join(sorted(parts))} but not the {a_key}/{b_key} pair "
                       f"a {kind} layer takes", "re-save the adapter with PEFT's save_pretrained().")
        weight = canonical(f"{module}.weight")
        if weight not in outputs:
            raise _bad(f"the base model has no weight for LoRA module {module!r}")
        if weight in untie:
            raise _bad(f"LoRA on {module} and a modules_to_save replacement both change the tied weight {weight}",
                       "merge this adapter with PEFT's merge_and_unload() and export the merged model folder.")
        a_shape, b_shape = tuple(adapter.shape(parts[a_key])), tuple(adapter.shape(parts[b_key]))
        w_shape = tuple(outputs[weight].shape)
        if kind == "linear":  # W [out, in], A [r, in], B [out, r]
            fits = a_shape[1:] == w_shape[1:] and b_shape[:1] == w_shape[:1]
        else:  # W [in, out] (Conv1D) or [vocab, dim] (embedding: A [r, vocab], B [dim, r])
            fits = a_shape[1:] == w_shape[:1] and b_shape[:1] == w_shape[1:]
        if not fits or len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise _bad(f"{module}: base weight {list(w_shape)}, A {list(a_shape)} and B {list(b_shape)} do not fit")
        if a_shape[0] != r:
            raise _bad(f"{module} has rank {a_shape[0]} but adapter_config.json gives it r={r} (r / rank_pattern)",
                       "fix r or rank_pattern in adapter_config.json to match the saved weights.")
        dora = "lora_magnitude_vector" in parts
        if dora != use_dora:
            raise _bad(f"{module} {'has' if dora else 'lacks'} a DoRA magnitude vector but adapter_config.json says "
                       f"use_dora={str(use_dora).lower()}", "fix use_dora in adapter_config.json to match the weights.")
        op_parts = {"A": parts[a_key], "B": parts[b_key]}
        if dora:
            op_parts["magnitude"] = parts["lora_magnitude_vector"]
            want = w_shape[0] if kind == "linear" else w_shape[1]
            got = tuple(adapter.shape(parts["lora_magnitude_vector"]))
            if got != (want,):
                raise _bad(f"{module}'s DoRA magnitude has shape {list(got)}, expected [{want}]")
            if outputs[weight].ops:
                raise _bad(f"DoRA on {module} and LoRA on another module change the same tied weight {weight}",
                           "merge this adapter with PEFT's merge_and_unload() and export the merged model folder.")
        op = _Op(module, "dora" if dora else "lora", op_parts, scale,
                 transposed=kind != "linear", norm_dim=1 if kind == "linear" else 0)
        outputs[weight].ops.append(op)
        if "lora_B.bias" in parts:
            bias = canonical(f"{module}.bias")
            if bias not in outputs:
                raise _bad(f"{module} has a lora_B.bias (lora_bias=true) but its base layer has no bias, "
                           "so PEFT cannot merge it either", "retrain with lora_bias=False.")
            outputs[bias].ops.append(_Op(module, "bias", {"bias": parts["lora_B.bias"]}, scale))
        lora_modules[module] = op.kind
    for t in sorted(tokens, key=lambda t: order.get(t.module, len(order))):  # PEFT merges them in module order
        outputs[canonical(f"{t.module}.weight")].ops.append(_Op(t.module, "tokens", {"delta": t.delta}, 1.0,
                                                                  indices=t.indices))
    check_coverage(cfg, layout, modules)
    if vocab.resized:
        config_updates["vocab_size"] = vocab.size

    injection = Injection(
        strategy="dense_lora",
        lora_r=int(cfg["r"]),
        lora_alpha=float(cfg.get("lora_alpha", 8)),
        use_rslora=bool(cfg.get("use_rslora")),
        target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in lora_modules})),
    )
    return AdapterMerge(cfg, outputs, injection, config_updates, lora_modules, replaced, vocab)


def check_coverage(cfg: dict[str, Any], layout: Any, modules: dict[str, dict[str, str]]) -> None:
    """Every layer target_modules selects has its LoRA weights: PEFT would have trained (and saved) them all.

    A module selected but absent from the adapter would be exported unchanged, computing
    something the adapter never did; an adapter whose targets select nothing in this base
    is one PEFT itself refuses to load.
    """
    if cfg.get("target_modules") is None:
        return
    selected = [m for m, kind in layout.kinds.items()
                if kind in ("linear", "conv1d", "embedding") and match_target(cfg, m, layout)]
    if not selected:
        raise _bad(f"adapter_config.json's target_modules {str(cfg['target_modules'])[:60]} select no layer of the "
                   "base model")
    missing = [m for m in selected if m not in modules]
    if missing:
        raise _bad(f"adapter_config.json's target_modules select {missing[0]} but the adapter has no LoRA weights for "
                   f"it ({len(missing)} such modules)",
                   "re-save the adapter with PEFT's save_pretrained(), or pass --base-model with the model it was "
                   "trained on.")


def merged_reader(merge: AdapterMerge, base: TensorSource, adapter: TensorSource) -> Reader:
    """A Reader over the final names whose ``get`` returns the merged tensor.

    ``reader.get_exact(name)`` is the float32 result before its one cast, for the names in
    ``reader.exact_names`` (those the adapter computes; the rest are read as they are).
    """
    outputs = merge.outputs

    def start(out: _Output) -> torch.Tensor:
        where, src = out.start
        if where == "resized":
            return resize_rows(base.get(src), out.shape[0])
        return (adapter if where == "adapter" else base).get(src)

    def get_exact(name: str) -> torch.Tensor:
        out = outputs[name]
        t = start(out).to(torch.float32)
        for op in out.ops:
            t = op.apply_f32(t, adapter.get)
        return t

    def get(name: str) -> torch.Tensor:
        out = outputs[name]
        t = get_exact(name) if out.ops else start(out)
        return t if t.dtype == out.dtype else t.to(out.dtype)  # replacements load in the base's dtype, as in PEFT

    exact = frozenset(n for n, out in outputs.items() if out.ops)
    return Reader(list(outputs), lambda n: tuple(outputs[n].shape), lambda n: outputs[n].dtype, get,
                  exact_names=exact, get_exact=get_exact)


def open_adapter_source(run: ResolvedRun) -> tuple[ResolvedRun, AdapterSource, Injection, Reader]:
    """The run with the merged config, the combined source, the injection and the merged reader.

    The option policy runs first, then the merge is planned once from headers (no tensor data).
    """
    info = run.adapter
    assert info is not None, "open_adapter_source takes a PEFT adapter run"
    check_adapter_config(info.adapter_config)
    base = TensorSource(info.base_dir)
    try:
        adapter = TensorSource(run.checkpoint_dir, weights_prefix="adapter_model")
    except Exception:
        base.close()
        raise
    source = AdapterSource(base, adapter)
    try:
        tok = tokenizer_dir([run.checkpoint_dir, run.run_dir, info.base_dir])  # the one the export writes
        merge = plan_adapter_merge(info.adapter_config, info.base_config, base, adapter, tok)
    except Exception:
        source.close()
        raise
    inj, v = merge.injection, merge.vocab
    vocabulary = {**({"base_size": v.base_size, "size": v.size} if v and v.resized else {}),
                  **({"untied": True} if merge.config_updates.get("tie_word_embeddings") is False else {})}
    run = replace(run, hf_config={**info.base_config, **merge.config_updates}, vocabulary=vocabulary or None,
                  block={**inj.as_dict(), "use_dora": bool(info.adapter_config.get("use_dora"))})
    return run, source, inj, merged_reader(merge, base, adapter)
