"""The GGUF's key/value metadata: ``general.*`` and the architecture's hyperparameters.

Keys are written in llama.cpp's converter order, the shared ones here and the
family's own (experts, sliding window, soft-capping) through its table entry
(:mod:`.families`); llama.cpp reads them to build its graph, so a missing or wrong
key computes a different model.
"""

from __future__ import annotations

import os
from typing import Any

from .config import head_dim, n_heads, n_kv_heads, n_layers, rope_type, rotary_dims
from .families import Family


def add_hparams(w: Any, hf_config: dict, fam: Family, file_type: Any) -> None:
    import gguf

    cfg = hf_config
    w.add_block_count(n_layers(cfg))
    w.add_context_length(int(cfg.get("max_position_embeddings") or fam.context_length))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_heads(cfg))
    w.add_head_count_kv(n_kv_heads(cfg))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_key_length(head_dim(cfg))
    w.add_value_length(head_dim(cfg))
    w.add_vocab_size(int(cfg["vocab_size"]))
    if fam.rope_dimension_count:
        w.add_rope_dimension_count(rotary_dims(cfg))

    full, _ = fam.rope(cfg)
    theta = full.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        theta = fam.rope_theta
    w.add_rope_freq_base(float(theta))
    if rope_type(full) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(full["factor"]))
    elif rope_type(full) == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(full["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(full["original_max_position_embeddings"]))

    if fam.hparams is not None:
        fam.hparams(w, cfg)
    w.add_file_type(int(file_type))


def hub_ids(base: Any) -> list[str]:
    """``base_model`` as Hub ids only: never a local path (absolute, relative, or an existing folder)."""
    bases = [base] if isinstance(base, str) else list(base or [])
    return [str(b) for b in bases if b and not os.path.isabs(str(b)) and not str(b).startswith((".", "~"))
            and not os.path.exists(str(b)) and str(b).count("/") <= 1]


def add_general(w: Any, name: str, metadata: dict | None, n_params: int) -> None:
    import gguf

    md = dict(metadata or {})
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_quantized_by(str(md.get("quantized_by") or "efexport"))
    if md.get("author"):
        w.add_author(str(md["author"]))
    if md.get("version"):
        w.add_version(str(md["version"]))
    if md.get("finetune"):
        w.add_finetune(str(md["finetune"]))
    if md.get("description"):
        w.add_description(str(md["description"]))
    if md.get("license"):
        w.add_license(str(md["license"]))
    bases = hub_ids(md.get("base_model"))
    if bases:
        w.add_base_model_count(len(bases))
        for i, b in enumerate(bases):
            w.add_base_model_name(i, b.split("/")[-1])
            if "/" in b:
                w.add_base_model_organization(i, b.split("/")[0])
                w.add_base_model_repo_url(i, f"https://huggingface.co/{b}")
    if md.get("tags"):
        w.add_tags(list(md["tags"]))
    if md.get("languages"):
        w.add_languages(list(md["languages"]))
    if n_params > 0:
        w.add_size_label(gguf.size_label(n_params, 0, 0, 0))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
