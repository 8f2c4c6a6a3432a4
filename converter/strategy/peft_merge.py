"""PEFT adapter folders (run-format.md §4): resolution, option checks and the merged reader.

A PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) is a
``dense_lora`` checkpoint whose frozen weights live in a separate base model. This
module

* finds that base (``--base-model``, the run's ``model.name_or_path``, then the adapter's
  ``base_model_name_or_path``), as a local folder or a Hub id already in the local
  Hugging Face cache: nothing is downloaded unless the caller asks for it;
* refuses every PEFT type and option whose merge it cannot reproduce exactly (three-line
  errors naming it), instead of ignoring it;
* plans, from names, shapes and the base's module classes only (no tensor data), the
  merged weight of every base tensor, exactly as PEFT's ``merge_and_unload()`` computes
  it: per-module scale (``rank_pattern`` / ``alpha_pattern`` / rsLoRA), ``fan_in_fan_out``
  (Conv1D layouts), embedding LoRA, ``lora_bias``, DoRA magnitudes, ``modules_to_save``
  and trained biases replacing whole tensors, tied embeddings;
* exposes the result as a :class:`~converter.transforms.Reader` over the final Hugging Face
  names, so the pipeline streams it like any other source. Plain LoRA goes through
  :func:`converter.transforms.merge_lora_f32`, the same code as EulerForge's ``dense_lora``;
  every merged tensor is computed in float32 and rounded once (``Reader.get_exact`` gives
  the float32 result, for a later cast or quantization).

Nothing here imports ``peft``: the key layout and matching rules below mirror PEFT's own
(``peft.tuners.tuners_utils.check_target_module_exists``, ``peft.utils.other.get_pattern_key``,
``peft.tuners.lora.variants.DoraLinearVariant``) and the tests prove them against PEFT.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import fail
from .run import Injection, ResolvedRun, _backbone, _step_of, read_json
from .source import TensorInfo, TensorSource
from .transforms import Reader, merge_lora_f32

SEE_ADAPTERS = "docs: README.md#peft-adapters"
PEFT_PREFIX = "base_model.model."
# How a user asks efexport to fetch a base model that is not available locally.
DOWNLOAD_OPTION = "--download-base (download_base=True in the API)"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
BASE_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]

_LORA_PART = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector(?:\.weight)?)$"
)
_PEFT_MARKERS = re.compile(
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
    "init_lora_weights", "ensure_weight_tying",
}
# init_lora_weights values that only initialise A and B (the base weights stay the base model's).
# (True/False are accepted too.)
_PLAIN_INITS = {"gaussian", "eva", "orthogonal"}
_OPTION_WHY = {
    "layer_replication": "it duplicates decoder layers, so the merged model is not the base architecture",
    "target_parameters": "LoRA on raw nn.Parameters (e.g. fused MoE experts) is not a Linear efexport can merge",
    "trainable_token_indices": "trainable-token deltas are not merged by efexport yet",
    "use_qalora": "QA-LoRA pools the input and merges into quantized weights",
    "alora_invocation_tokens": "activated LoRA only applies after its invocation tokens, so it cannot be merged",
    "arrow_config": "Arrow routes between adapters per token, so it cannot be merged",
    "use_bdlora": "block-diagonal LoRA is a variant efexport does not merge",
    "velora_config": "VeLoRA is a variant efexport does not merge",
    "monteclora_config": "MonteCLoRA is a variant efexport does not merge",
    "kasa_config": "KaSA is a variant efexport does not merge",
}


# --------------------------------------------------------------------------- configuration checks


def read_adapter_config(ckpt_dir: Path) -> dict[str, Any]:
    return read_json(Path(ckpt_dir) / "adapter_config.json")


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
    r = cfg.get("r")
    if not isinstance(r, int) or r <= 0 or not isinstance(cfg.get("lora_alpha", 8), (int, float)):
        raise fail(f"merge the LoRA adapter: r={_short(r)} / lora_alpha={_short(cfg.get('lora_alpha'))} in {where} "
                   "are not a positive rank and a number", f"repair {where}.", SEE_ADAPTERS)


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "", [], {}, ())


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- finding the base model


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?", name)) and ".." not in name


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local snapshot folder of a Hub model already in the HF cache (no network access)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    try:
        hit = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # invalid repo id, unreadable cache: simply not available
        hit = None
    return Path(hit).parent if isinstance(hit, str) and Path(hit).is_file() else None


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=BASE_FILES))
    except Exception as exc:
        raise fail(
            f"download base model {repo_id!r}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}",
            "check the id and your network / HF token, or pass --base-model with a local folder.",
            SEE_ADAPTERS,
        ) from None


def _has_weights(folder: Path) -> bool:
    return any((folder / f).is_file() for f in (
        "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"))


def find_base(candidates: list[tuple[str, str, str | None]], *, download_base: bool = False) -> tuple[str, Path]:
    """First available base among (origin, name_or_path, revision); ``--base-model`` must be available itself."""
    tried: list[str] = []
    for origin, name, revision in candidates:
        local = Path(name).expanduser()
        if local.is_dir():
            if not (local / "config.json").is_file() or not _has_weights(local):
                raise fail(
                    f"use base model folder {name} ({origin}): it has no config.json and model weights",
                    "pass --base-model with a Hugging Face model folder (config.json + model.safetensors).",
                    SEE_ADAPTERS,
                )
            return name, local.resolve()
        snapshot = _cached_snapshot(name, revision) if _looks_like_hub_id(name) else None
        if snapshot is not None and _has_weights(snapshot):
            return name, snapshot
        if download_base and _looks_like_hub_id(name):
            return name, _download(name, revision)
        tried.append(f"{name!r} ({origin})")
        if origin == "--base-model":
            break
    if not tried:
        raise fail(
            "find the adapter's base model: adapter_config.json has no base_model_name_or_path and none was given",
            f"pass --base-model PATH_OR_ID (a local model folder, or a Hub id in the local cache; {DOWNLOAD_OPTION} "
            "fetches it).",
            SEE_ADAPTERS,
        )
    raise fail(
        f"find the adapter's base model: {', '.join(tried)} {'is' if len(tried) == 1 else 'are'} neither a local "
        "model folder nor a model in the local Hugging Face cache (efexport downloads nothing unless asked)",
        f"pass --base-model PATH_OR_ID with a local copy, or add {DOWNLOAD_OPTION} to fetch it from the Hub.",
        SEE_ADAPTERS,
    )


# --------------------------------------------------------------------------- resolution


def resolve_adapter(ckpt_dir: Path, path_type: str, run_dir: Path | None, checkpoint: str | None,
                    resolved_cfg: dict[str, Any], base_model: str | None, *,
                    download_base: bool = False) -> ResolvedRun:
    """Describe a PEFT adapter checkpoint: its options (checked), its base model, the merged config."""
    ckpt_dir = Path(ckpt_dir)
    cfg = read_adapter_config(ckpt_dir)
    check_adapter_config(cfg)
    if not any((ckpt_dir / f).is_file() for f in ADAPTER_WEIGHTS):
        raise fail(
            f"read the PEFT adapter in {ckpt_dir.name}: adapter_config.json is there "
            "but adapter_model.safetensors is not",
            "copy the adapter's weights (adapter_model.safetensors) next to its adapter_config.json.",
            SEE_ADAPTERS,
        )
    candidates: list[tuple[str, str, str | None]] = []
    if base_model:
        candidates.append(("--base-model", str(base_model), None))
    else:
        run_base = (resolved_cfg.get("model") or {}).get("name_or_path")
        if run_base:
            candidates.append(("resolved_config.json model.name_or_path", str(run_base), None))
        if cfg.get("base_model_name_or_path"):  # PEFT loads it at the adapter_config's "revision"
            candidates.append(("adapter_config.json base_model_name_or_path", str(cfg["base_model_name_or_path"]),
                               cfg.get("revision") or None))
    named, base_dir = find_base(candidates, download_base=download_base)

    base_config = read_json(base_dir / "config.json")
    base_config.pop("eulerforge", None)
    if base_config.get("quantization_config"):
        method = (base_config["quantization_config"] or {}).get("quant_method", "quantized")
        raise fail(
            f"merge the adapter into base model {named}: its weights are {method}-quantized (QLoRA-style base), "
            "and a merge into quantized weights is not exact",
            "pass --base-model with the original, unquantized model the quantized base was made from.",
            SEE_ADAPTERS,
        )
    # Plan the merge now (headers only) so every adapter error surfaces at resolution time.
    base_src, adapter_src = TensorSource(base_dir), TensorSource(ckpt_dir, weights_prefix="adapter_model")
    try:
        merge = plan_adapter_merge(cfg, base_config, base_src, adapter_src)
    finally:
        base_src.close()
        adapter_src.close()
    hf_config = {**base_config, **merge.config_updates}
    inj = merge.injection
    return ResolvedRun(
        path_type=path_type,
        checkpoint_dir=ckpt_dir,
        run_dir=run_dir,
        checkpoint=checkpoint,
        hf_config=hf_config,
        block={**inj.as_dict(), "use_dora": bool(cfg.get("use_dora"))},
        backbone=_backbone(resolved_cfg.get("backbone") or "", str(base_config.get("model_type", ""))),
        base_model=named,
        run_name=resolved_cfg.get("run_name") or (run_dir.name if run_dir else None),
        step=_step_of(ckpt_dir),
        source_kind="peft_adapter",
        extras={"base_dir": base_dir, "adapter_config": cfg, "base_config": base_config, "adapter": merge.summary()},
    )


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

    from .layouts import meta_model

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
    kind: str  # lora | dora | bias
    parts: dict[str, str]  # role -> adapter tensor name
    scale: float
    transposed: bool = False  # delta = (B @ A).T: embeddings and Conv1D (fan_in_fan_out)
    norm_dim: int = 1

    def apply_f32(self, t: torch.Tensor, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        if self.kind == "bias":
            return add_lora_bias_f32(t, get(self.parts["bias"]), self.scale)
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
    start: tuple[str, str]  # ("base" | "adapter", tensor name)
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

    def summary(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "peft_type": "LORA",
            "r": cfg.get("r"),
            "lora_alpha": cfg.get("lora_alpha"),
            "use_rslora": bool(cfg.get("use_rslora")),
            "use_dora": bool(cfg.get("use_dora")),
            "lora_modules": len(self.modules),
            "target_modules": list(self.injection.target_modules),
            "rank_pattern": dict(cfg.get("rank_pattern") or {}),
            "alpha_pattern": dict(cfg.get("alpha_pattern") or {}),
            "modules_to_save": list(cfg.get("modules_to_save") or []),
            "replaced_tensors": len(self.replaced),
            "untied_embeddings": self.config_updates.get("tie_word_embeddings") is False,
        }


def _strip(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _bad(why: str, fix: str = "the adapter does not match its base model; pass --base-model with the model it was "
                              "trained on.") -> Exception:
    return fail(f"merge the PEFT adapter: {why}", fix, SEE_ADAPTERS)


def plan_adapter_merge(cfg: dict[str, Any], base_config: dict[str, Any], base: TensorSource,
                       adapter: TensorSource) -> AdapterMerge:
    """Plan every merged tensor from names, shapes and the base's module classes (no tensor data)."""
    layout = model_layout(base_config)
    base_names = list(base.names)
    base_set = set(base_names)
    leftovers = [n for n in base_names if _PEFT_MARKERS.search(n) or ".base_layer." in n]
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
    for full in adapter.names:
        name = _strip(full)
        m = _LORA_PART.match(name)
        if m:
            part = m.group("part")
            if part.startswith("lora_magnitude_vector"):
                part = "lora_magnitude_vector"
            modules.setdefault(m.group("module"), {})[part] = full
        elif _PEFT_MARKERS.search(name):
            raise _bad(f"tensor {full!r} is not a LoRA, DoRA or whole-module tensor efexport knows how to merge",
                       "merge this adapter with PEFT's merge_and_unload() and export the merged model folder.")
        else:
            plain.setdefault(name.replace(".base_layer.", "."), []).append(full)

    outputs: dict[str, _Output] = {n: _Output(n, base.shape(n), base.dtype(n), ("base", n)) for n in base_names}
    replaced: list[str] = []

    # 2. whole tensors saved with the adapter: modules_to_save, trained biases (bias="all"/"lora_only"),
    #    and base layers PEFT saves next to a targeted embedding.
    untie: dict[str, dict[str, str]] = {}  # stored name -> {alias: adapter tensor}
    for name, fulls in plain.items():
        target = canonical(name)
        if target not in base_set:
            raise _bad(f"adapter tensor {fulls[0]!r} has no counterpart {name!r} in the base model")
        shape = tuple(adapter.shape(fulls[-1]))
        if shape != tuple(base.shape(target)):
            raise _bad(f"adapter tensor {fulls[-1]!r} has shape {list(shape)} but the base's {target} has "
                       f"{list(base.shape(target))} (a resized vocabulary, or another base model?)")
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
                outputs[member] = _Output(member, base.shape(target), base.dtype(target), ("base", target))
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

    injection = Injection(
        strategy="dense_lora",
        lora_r=int(cfg["r"]),
        lora_alpha=float(cfg.get("lora_alpha", 8)),
        use_rslora=bool(cfg.get("use_rslora")),
        target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in lora_modules})),
    )
    return AdapterMerge(cfg, outputs, injection, config_updates, lora_modules, replaced)


# --------------------------------------------------------------------------- the source seen by the pipeline


class AdapterSource:
    """Base model + adapter as one source: infos/names/files/nbytes/close, as the pipeline uses them."""

    def __init__(self, base: TensorSource, adapter: TensorSource) -> None:
        self.base, self.adapter = base, adapter
        self.infos: dict[str, TensorInfo] = {**base.infos, **adapter.infos}
        self.files = [*base.files, *adapter.files]

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def _of(self, name: str) -> TensorSource:
        return self.adapter if name in self.adapter.infos else self.base

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.infos[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._of(name).get(name)

    def nbytes(self) -> int:
        return self.base.nbytes() + self.adapter.nbytes()

    def close(self) -> None:
        self.base.close()
        self.adapter.close()

    def __enter__(self) -> "AdapterSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merged_reader(merge: AdapterMerge, base: TensorSource, adapter: TensorSource) -> Reader:
    """A Reader over the final names whose ``get`` returns the merged tensor.

    ``reader.get_exact(name)`` is the float32 result before its one cast, for the names in
    ``reader.exact_names`` (those the adapter computes; the rest are read as they are).
    """
    outputs = merge.outputs

    def start(out: _Output) -> torch.Tensor:
        where, src = out.start
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

    reader = Reader(list(outputs), lambda n: tuple(outputs[n].shape), lambda n: outputs[n].dtype, get)
    reader.exact_names = frozenset(n for n, out in outputs.items() if out.ops)  # type: ignore[attr-defined]
    reader.get_exact = get_exact  # type: ignore[attr-defined]
    return reader


def open_adapter_source(run: ResolvedRun) -> tuple[AdapterSource, Injection, Reader]:
    """(source, injection, reader) for the pipeline; reads headers only."""
    base = TensorSource(run.extras["base_dir"])
    try:
        adapter = TensorSource(run.checkpoint_dir, weights_prefix="adapter_model")
    except Exception:
        base.close()
        raise
    source = AdapterSource(base, adapter)
    try:
        merge = plan_adapter_merge(run.extras["adapter_config"], run.extras["base_config"], base, adapter)
    except Exception:
        source.close()
        raise
    return source, merge.injection, merged_reader(merge, base, adapter)
