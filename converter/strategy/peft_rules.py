"""PEFT's own rules, as data and pure functions: which options merge exactly, which modules match.

The option policy refuses every PEFT type and option whose merge efexport cannot reproduce
exactly; the matching rules mirror PEFT's (``check_target_module_exists``,
``get_pattern_key``) and the tests prove them against PEFT itself. Nothing here imports
``peft``.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import fail
from ..hf_model import meta_model
from ..source.peft_adapter import SEE_ADAPTERS

PEFT_PREFIX = "base_model.model."

LORA_PART = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector(?:\.weight)?)$"
)
PEFT_MARKERS = re.compile(
    r"(^|\.)(lora_\w+|token_adapter|modules_to_save|original_module|hada_\w+|lokr_\w+|ia3_l)(\.|$)"
)

# adapter_config.json keys that never change the merged weights (or that are checked on their own below).
_NEUTRAL_KEYS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "lora_dropout", "megatron_config", "megatron_core", "runtime_config", "qalora_group_size",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    # handled by the merge planner:
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "fan_in_fan_out", "bias", "lora_bias", "modules_to_save", "use_dora",
    "init_lora_weights", "ensure_weight_tying", "trainable_token_indices",
}
# init_lora_weights values that only initialise A and B (the base weights stay the base model's).
# (True/False are accepted too.)
_PLAIN_INITS = {"gaussian", "eva", "orthogonal"}
_OPTION_WHY = {
    "layer_replication": "it duplicates decoder layers, so the merged model is not the base architecture",
    "target_parameters": "LoRA on raw nn.Parameters (e.g. fused MoE experts) is not a Linear efexport can merge",
    "use_qalora": "QA-LoRA pools the input and merges into quantized weights",
    "alora_invocation_tokens": "activated LoRA only applies after its invocation tokens, so it cannot be merged",
    "arrow_config": "Arrow routes between adapters per token, so it cannot be merged",
    "use_bdlora": "block-diagonal LoRA is a variant efexport does not merge",
    "velora_config": "VeLoRA is a variant efexport does not merge",
    "monteclora_config": "MonteCLoRA is a variant efexport does not merge",
    "kasa_config": "KaSA is a variant efexport does not merge",
}


def check_adapter_config(cfg: dict[str, Any], where: str = "adapter_config.json") -> None:
    """Refuse every PEFT type and option whose merge efexport cannot reproduce exactly."""
    peft_type = str(cfg.get("peft_type") or "").upper()
    if peft_type != "LORA":
        name = peft_type or "(missing peft_type)"
        raise fail(
            f"merge PEFT adapter type {name}: efexport merges LoRA adapters (with DoRA, rsLoRA and their options) only",
            f"export a LoRA adapter (peft_type LORA), or merge this {name} adapter with PEFT's merge_and_unload() "
            "and export the resulting model folder.",
            SEE_ADAPTERS,
        )
    for key, why in _OPTION_WHY.items():
        if _truthy(cfg.get(key)):
            raise fail(
                f"merge the LoRA adapter: option {key}={_short(cfg.get(key))} in {where} is not supported ({why})",
                "merge it with PEFT's merge_and_unload() and export the merged model folder, "
                f"or retrain without {key}.",
                SEE_ADAPTERS,
            )
    init = cfg.get("init_lora_weights", True)
    if not (isinstance(init, bool) or (isinstance(init, str) and init.lower() in _PLAIN_INITS)):
        raise fail(
            f"merge the LoRA adapter: init_lora_weights={_short(init)} in {where} means it was trained against a "
            "modified (residual) base, so merging it into the original base would be wrong",
            "re-save it with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a plain "
            "LoRA adapter, then export that.",
            SEE_ADAPTERS,
        )
    bias = cfg.get("bias", "none")
    if bias not in (None, "none", "all", "lora_only"):
        raise fail(f"merge the LoRA adapter: bias={_short(bias)} in {where} is not a PEFT bias mode",
                   'fix "bias" (none, all or lora_only).', SEE_ADAPTERS)
    for key, value in cfg.items():
        if key not in _NEUTRAL_KEYS and key not in _OPTION_WHY and _truthy(value):
            raise fail(
                f"merge the LoRA adapter: option {key}={_short(value)} in {where} is unknown to efexport, "
                "and it may change the merged weights",
                f"remove {key} from {where} if it does not change the weights, "
                "or merge with PEFT's merge_and_unload().",
                SEE_ADAPTERS,
            )
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", 8)
    if not _rank(r) or not _number(alpha):
        raise fail(f"merge the LoRA adapter: r={_short(r)} / lora_alpha={_short(alpha)} in {where} "
                   "are not a positive rank and a finite number", f"repair {where}.", SEE_ADAPTERS)
    check_option_types(cfg, where)


def _rank(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _names(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def _token_ids(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in x)


def _regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return False
    return True


# Every option the merge reads: what it must be (a value of another type is named, not a traceback).
_OPTION_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
    "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
    "lora_bias": ("true or false", lambda v: isinstance(v, bool)),
    "ensure_weight_tying": ("true or false", lambda v: isinstance(v, bool)),
    "target_modules": ("a list of module names or a regular expression",
                       lambda v: (isinstance(v, str) and _regex(v)) or (_names(v) and all(map(_regex, v)))),
    "exclude_modules": ("a list of module names or a regular expression",
                        lambda v: (isinstance(v, str) and _regex(v)) or _names(v)),
    "modules_to_save": ("a list of module names", lambda v: _names(v) and all(map(_regex, v))),
    "layers_to_transform": ("a layer index or a list of them",
                            lambda v: (isinstance(v, int) and not isinstance(v, bool))
                            or (isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v))),
    "layers_pattern": ("a name or a list of names",
                       lambda v: (isinstance(v, str) and _regex(v)) or (_names(v) and all(map(_regex, v)))),
    "trainable_token_indices": ("a list of token ids or an object of module name: token ids",
                                lambda v: _token_ids(v) or (isinstance(v, dict) and all(
                                    isinstance(k, str) and _token_ids(x) for k, x in v.items()))),
    "rank_pattern": ("an object of pattern: rank",
                     lambda v: isinstance(v, dict) and all(_regex(k) and _rank(x) for k, x in v.items())),
    "alpha_pattern": ("an object of pattern: alpha",
                      lambda v: isinstance(v, dict) and all(_regex(k) and _number(x) for k, x in v.items())),
}


def check_option_types(cfg: dict[str, Any], where: str = "adapter_config.json") -> None:
    """Each option the merge reads has the type PEFT gives it (patterns are valid regular expressions)."""
    for key, (what, ok) in _OPTION_TYPES.items():
        value = cfg.get(key)
        if value is not None and not ok(value):
            raise fail(f"merge the LoRA adapter: option {key}={_short(value)} in {where} is not {what}",
                       f"fix {key} in {where} (as PEFT's LoraConfig would save it).", SEE_ADAPTERS)


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "", [], {}, ())


def _short(value: Any) -> str:
    try:
        text = json.dumps(value) if not isinstance(value, str) else repr(value)
    except (RecursionError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- the base model's modules


@dataclass(frozen=True)
class ModelLayout:
    """What PEFT sees of the base model: module classes in order, and tied parameters."""

    kinds: dict[str, str]  # module name -> linear | conv1d | embedding | other (named_modules order)
    alias: dict[str, str]  # parameter name -> canonical name (the first of a tied group)
    output_embedding: str | None
    input_embedding: str | None


@functools.lru_cache(maxsize=8)
def _layout_cached(config_json: str) -> ModelLayout:
    from torch import nn


    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()  # noqa: N806
    model = meta_model(json.loads(config_json), None)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # as from_pretrained does; meta_model skips it
    kinds: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, nn.Embedding):
            kinds[name] = "embedding"
        elif Conv1D and isinstance(module, Conv1D):
            kinds[name] = "conv1d"
        elif isinstance(module, nn.Linear):
            kinds[name] = "linear"
        else:
            kinds[name] = "other"
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        alias[name] = first.setdefault(id(p), name)
    names = {id(m): n for n, m in model.named_modules()}
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return ModelLayout(kinds, alias, names.get(id(out_emb)), names.get(id(in_emb)))


def model_layout(hf_config: dict[str, Any]) -> ModelLayout:
    try:
        return _layout_cached(json.dumps(hf_config, sort_keys=True, default=str))
    except Exception as exc:
        if getattr(exc, "cannot", None):
            raise
        raise fail(
            f"build the base model's structure from its config.json: {type(exc).__name__}: {str(exc)[:160]}",
            "pass --base-model with a Hugging Face causal-LM folder whose model_type this transformers knows.",
            SEE_ADAPTERS,
        ) from None


# --------------------------------------------------------------------------- PEFT's matching rules


def match_target(cfg: dict[str, Any], key: str, layout: ModelLayout) -> bool:
    """``peft.tuners.tuners_utils.check_target_module_exists`` on a module name."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    for m in cfg.get("modules_to_save") or []:
        if re.match(rf"(^|.*\.){m}($|\..*)", key):
            return False
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return layout.kinds.get(key) in ("linear", "conv1d") and key != layout.output_embedding
        return re.fullmatch(targets, key) is not None
    targets = list(targets or [])
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    indexes = cfg.get("layers_to_transform")
    using_indexes = indexes is not None and (len(indexes) != 0 if isinstance(indexes, list) else True)
    if not (using_indexes and found):
        return found
    pattern = cfg.get("layers_pattern")
    match = None
    if pattern is None or len(pattern) == 0:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == indexes if isinstance(indexes, int) else idx in indexes


def pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """``peft.utils.other.get_pattern_key``: the first pattern whose regex ends the module name."""
    for p in patterns or {}:
        if re.match(rf"(.*\.)?({p})$", key):
            return patterns[p]
    return default


def module_scale(cfg: dict[str, Any], module: str) -> tuple[int, float, float]:
    """(r, alpha, scale) of one module: rank_pattern / alpha_pattern, then rsLoRA or alpha / r."""
    r = int(pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"]))
    alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8)))
    scale = alpha / (r**0.5 if cfg.get("use_rslora") else r)
    return r, alpha, scale
