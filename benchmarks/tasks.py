"""The measured tasks: one table shared by bench_export.py (which runs them) and report.py
(which labels them in the tables), so neither imports the other."""

from __future__ import annotations

# task -> (group, label)
TASKS = {
    "cp": ("bf16", "cp -r checkpoint"),
    "efx_bf16": ("bf16", "efexport --precision bf16 --no-verify"),
    "peft_bf16": ("bf16", "PEFT merge_and_unload + save_pretrained"),
    "efx_bf16_parity": ("bf16", "efexport --precision bf16 (with parity)"),
    "cp_sync": ("bf16", "cp -r checkpoint && sync"),
    "efx_int4": ("int4", "efexport --precision int4 --no-verify"),
    "tf_int4": ("int4", "transformers bnb nf4 from_pretrained + save_pretrained"),
    "efx_int4_parity": ("int4", "efexport --precision int4 (with parity)"),
    "efx_int8": ("int8", "efexport --precision int8 --no-verify"),
    "tf_int8": ("int8", "transformers bnb LLM.int8 from_pretrained + save_pretrained"),
    "load_artifact_bf16": ("load", "load_artifact(bf16 artifact)"),
    "from_pretrained_bf16": ("load", "from_pretrained(bf16 artifact)"),
    "load_artifact_bf16_noverify": ("load", "load_artifact(bf16 artifact, verify=False)"),
    "load_artifact_int4": ("load", "load_artifact(int4 artifact)"),
    "from_pretrained_int4": ("load", "from_pretrained(int4 artifact)"),
    # --gguf: GGUF export against PEFT merge + llama.cpp's converter (+ llama_model_quantize)
    "efx_gguf_q8_0": ("gguf", "efexport --format gguf --precision q8_0 --no-verify"),
    "efx_gguf_q8_0_parity": ("gguf", "efexport --format gguf --precision q8_0 (with parity in llama.cpp)"),
    "llamacpp_q8_0": ("gguf", "PEFT merge + save, convert_hf_to_gguf.py --outtype q8_0"),
    "efx_gguf_q4_k_m": ("gguf", "efexport --format gguf --precision q4_k_m --no-verify"),
    "llamacpp_q4_k_m": ("gguf", "PEFT merge + save, convert_hf_to_gguf.py f16, llama_model_quantize Q4_K_M"),
    "quantize_only_q4_k_m": ("gguf", "llama_model_quantize alone, f16 GGUF -> Q4_K_M (the K-quant step's own floor)"),
}
PARITY_TASKS = {"efx_bf16_parity", "efx_int4_parity", "efx_gguf_q8_0_parity"}
GGUF_TASKS = {t for t, (group, _) in TASKS.items() if group == "gguf"}
# the order of a --gguf run (cp: the disk floor, beside the GGUF rows)
GGUF_ORDER = ["cp", "efx_gguf_q8_0", "efx_gguf_q8_0_parity", "llamacpp_q8_0", "efx_gguf_q4_k_m", "llamacpp_q4_k_m", "quantize_only_q4_k_m"]
