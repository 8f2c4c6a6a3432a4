"""The Ollama ``Modelfile`` written next to the GGUF: FROM, the chat TEMPLATE, the stop tokens.

Ollama does not run the Hugging Face Jinja chat template; for the three template
families these models use (ChatML, Llama 3, Gemma) it gets the equivalent Go template,
and the stop tokens come from the tokenizer so generation ends where the model's turn
does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .tokenizer import TokenizerFiles, tokenizer_files

OLLAMA_TEMPLATES = {
    "chatml": (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n"
    ),
    "llama3": (
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "gemma": (
        "{{- range .Messages }}{{- if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n"
        "{{- else }}<start_of_turn>user\n{{ .Content }}<end_of_turn>\n{{- end }}\n{{ end }}<start_of_turn>model\n"
    ),
}
TURN_END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}
#: end-of-turn / end-of-text tokens, added as stops when the vocabulary has them
KNOWN_STOPS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<|eom_id|>")


def _chat_template(tok: TokenizerFiles) -> str | None:
    if tok.has("chat_template.jinja"):
        return tok.file("chat_template.jinja").read_text(encoding="utf-8")
    if tok.has("tokenizer_config.json"):
        ct = tok.config.get("chat_template")
        if isinstance(ct, str):
            return ct
        if isinstance(ct, list):
            for item in ct:
                if item.get("name") == "default":
                    return item.get("template")
    if tok.has("chat_template.json"):
        ct = (tok.read_json("chat_template.json") or {}).get("chat_template")
        if isinstance(ct, str):
            return ct
    return None


def _template_family(tpl: str | None) -> str | None:
    if not tpl:
        return None
    if "<|im_start|>" in tpl and "<|im_end|>" in tpl:
        return "chatml"
    if "<|start_header_id|>" in tpl and "<|eot_id|>" in tpl:
        return "llama3"
    if "<start_of_turn>" in tpl and "<end_of_turn>" in tpl:
        return "gemma"
    return None


def _stop_tokens(tok: TokenizerFiles, family: str | None) -> list[str]:
    id_to_content: dict[int, str] = {}
    tj = tok.tokenizer_json()
    if tj:
        for at in tj.get("added_tokens") or []:
            id_to_content[int(at["id"])] = at["content"]
    stops: list[str] = []

    def add(t: Any) -> None:
        if isinstance(t, dict):
            t = t.get("content")
        if isinstance(t, str) and t and t not in stops:
            stops.append(t)

    if family:
        add(TURN_END[family])
    add(tok.config.get("eos_token"))
    gc = tok.read_json("generation_config.json")
    if gc is not None:
        eos = gc.get("eos_token_id")
        for tid in eos if isinstance(eos, list) else [eos]:
            if isinstance(tid, int) and tid in id_to_content:
                add(id_to_content[tid])
    if tj:
        for t in KNOWN_STOPS:
            if t in id_to_content.values():
                add(t)
    return stops


def write_modelfile(folder: Path, gguf_filename: str, tokenizer_dir: Path | TokenizerFiles) -> Path:
    """Write an Ollama ``Modelfile``: FROM, TEMPLATE (for ChatML / Llama 3 / Gemma chat templates), stops."""
    folder = Path(folder)
    tok = tokenizer_files(tokenizer_dir)
    family = _template_family(_chat_template(tok))
    lines = [f"FROM ./{gguf_filename}", ""]
    if family:
        lines += [f'TEMPLATE """{OLLAMA_TEMPLATES[family]}"""', ""]
    for s in _stop_tokens(tok, family):
        lines.append(f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}")
    path = folder / "Modelfile"
    path.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    return path
