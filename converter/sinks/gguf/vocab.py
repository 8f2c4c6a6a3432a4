"""The tokenizer as llama.cpp's converter writes it into a GGUF.

Byte-level BPE (``tokenizer.json``) is written as ``gpt2`` with its pre-tokenizer
identified (the check-text hash first, then the exact pre-tokenizer configuration),
so llama.cpp splits text as Hugging Face does; SentencePiece (``tokenizer.model``)
is written as ``llama``. The vocabulary is padded to the config's ``vocab_size`` with
``[PAD{i}]``. Anything else is refused: a wrong pre-tokenizer tokenizes differently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ...errors import fail
from .config import SEE
from .families import Family
from .spm import CONTROL, UNUSED, USER_DEFINED, read_sentencepiece_model
from .tokenizer import TokenizerFiles

# llama.cpp identifies a BPE pre-tokenizer by the sha256 of the token ids of this
# text (convert_hf_to_gguf.py, get_vocab_base_pre).
CHKTXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis '
    'concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 '
    'កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български '
    '\'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? '
    '\'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
)
# The hashes of the families this project exports (facts from llama.cpp's converter table).
PRE_HASHES = {
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",      # Qwen1.5 .. Qwen3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",      # Qwen3-Embedding
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3 / 3.x
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",      # GPT-2
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",      # SmolLM
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # R1-Distill-Qwen
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",     # Mistral-Nemo
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",     # Phi-4-mini (o200k)
}
# The split regexes of the pre-tokenizers llama.cpp implements for these names
# (as they appear in the models' tokenizer.json).
QWEN2_PRETOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PRETOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass
class VocabInfo:
    kind: str            # tokenizer.ggml.model: "gpt2" | "llama"
    pre: str             # tokenizer.ggml.pre


def _pre_by_hash(tok: TokenizerFiles) -> str | None:
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers ships with transformers
        return None
    try:
        ids = Tokenizer.from_file(str(tok.file("tokenizer.json"))).encode(CHKTXT).ids
    except Exception:
        return None
    return PRE_HASHES.get(hashlib.sha256(str(ids).encode()).hexdigest())


def _pre_by_config(tj: dict) -> str | None:
    """Identify the pre-tokenizer from its exact configuration in tokenizer.json."""
    pre = tj.get("pre_tokenizer") or {}
    norm = tj.get("normalizer")
    ignore_merges = bool((tj.get("model") or {}).get("ignore_merges", False))
    norm_type = (norm or {}).get("type")

    def bytelevel_ok(p: dict, use_regex: bool) -> bool:
        return p.get("type") == "ByteLevel" and not p.get("add_prefix_space", False) and bool(p.get("use_regex", True)) == use_regex

    if pre.get("type") == "ByteLevel":
        if bytelevel_ok(pre, True) and norm is None and not ignore_merges:
            return "gpt-2"
        return None
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if len(parts) != 2:
            return None
        split, bl = parts
        if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert", False):
            return None
        if not bytelevel_ok(bl, False):
            return None
        regex = (split.get("pattern") or {}).get("Regex")
        if regex == QWEN2_PRETOKENIZER_REGEX and norm_type in (None, "NFC") and not ignore_merges:
            return "qwen2"
        if regex == LLAMA3_PRETOKENIZER_REGEX and norm is None and ignore_merges:
            return "llama-bpe"
    return None


def identify_vocab(tok: TokenizerFiles) -> VocabInfo:
    """Which tokenizer model and pre-tokenizer llama.cpp will use, or a refusal."""
    if tok.has("tokenizer.model"):
        try:
            read_sentencepiece_model(tok.file("tokenizer.model"))
        except Exception as e:
            raise fail(
                f"read the SentencePiece tokenizer {tok.path.name}/tokenizer.model ({e})",
                "check that the checkpoint's tokenizer.model is a SentencePiece model file", SEE,
            ) from e
        return VocabInfo("llama", "default")
    tj = tok.tokenizer_json()
    if tj is None:
        raise fail(
            f"write the GGUF vocabulary: {tok.path.name or tok.path} has neither tokenizer.json nor tokenizer.model",
            "save the tokenizer next to the checkpoint (tokenizer.save_pretrained(DIR))", SEE,
        )
    model = tj.get("model") or {}
    pre = tj.get("pre_tokenizer") or {}
    is_byte_level = model.get("type") == "BPE" and not model.get("byte_fallback", False) and (
        pre.get("type") == "ByteLevel" or any(p.get("type") == "ByteLevel" for p in pre.get("pretokenizers") or [])
    )
    if model.get("type") == "BPE" and model.get("byte_fallback", False):
        raise fail(
            f"write the GGUF vocabulary of {tok.path.name or tok.path}: its tokenizer.json is SentencePiece-style BPE "
            "(byte fallback) and there is no tokenizer.model; llama.cpp's converter would give every piece the same "
            "score, which tokenizes differently",
            "put the base model's tokenizer.model next to tokenizer.json (Llama 2, Mistral, Gemma and Phi-3 ship "
            "one), or export with --format hf", SEE,
        )
    if not is_byte_level:
        raise fail(
            f"write the GGUF vocabulary from tokenizer.json with model {model.get('type')!r}: only byte-level BPE "
            "(tokenizer.json) and SentencePiece (tokenizer.model) are written",
            "provide the model's tokenizer.model (SentencePiece) or a byte-level BPE tokenizer.json", SEE,
        )
    res = _pre_by_hash(tok) or _pre_by_config(tj)
    if res is None:
        raise fail(
            "identify the BPE pre-tokenizer of tokenizer.json: it matches none that llama.cpp implements for this "
            f"export ({', '.join(dict.fromkeys(PRE_HASHES.values()))})",
            "use the base model's own, unmodified tokenizer (its check-text hash identifies it) or export with --format hf",
            SEE,
        )
    return VocabInfo("gpt2", res)


#: llama.cpp sets token attributes for a model whose general.name contains these (llama-vocab.cpp) and
#: then needs the tokens below in the vocabulary, or the file does not load
NAME_RULES = {("phi-3", "phi3"): ("</s>", "<unk>", "<s>", "<|endoftext|>")}


def check_name_for_llama_cpp(name: str, tok: TokenizerFiles, info: VocabInfo) -> None:
    """Refuse a ``general.name`` that makes llama.cpp look up tokens this vocabulary lacks."""
    for needles, needed in NAME_RULES.items():
        if not any(n in name.lower() for n in needles):
            continue
        if info.kind == "llama":
            have = {p for p, _, _ in read_sentencepiece_model(tok.file("tokenizer.model"))}
        else:
            tj = tok.tokenizer_json() or {}
            have = set((tj.get("model") or {}).get("vocab") or {})
        have |= {a["content"] for a in (tok.tokenizer_json() or {}).get("added_tokens") or []}
        have |= {d.get("content") for d in (tok.config.get("added_tokens_decoder") or {}).values()}
        missing = [t for t in needed if t not in have]
        if missing:
            raise fail(
                f"write GGUF named {name!r}: llama.cpp treats a name containing {' or '.join(needles)!r} as Phi-3 and "
                f"needs the tokens {', '.join(missing)}, which this vocabulary lacks (the file would not load)",
                "choose a --name without 'phi3' / 'phi-3'", SEE,
            )


def _looks_special(tok: str) -> bool:
    return (
        tok in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (tok.startswith("<|") and tok.endswith("|>"))
        or (tok.startswith("<｜") and tok.endswith("｜>"))
        or (tok.startswith("<unused") and tok.endswith(">"))
    )


def bpe_vocab(tok: TokenizerFiles, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and types of a byte-level BPE vocabulary, padded to ``vocab_size``."""
    import gguf

    tj = tok.tokenizer_json()
    assert tj is not None
    reverse: dict[int, str] = {i: t for t, i in (tj["model"].get("vocab") or {}).items()}
    added: dict[int, dict] = {}
    for at in tj.get("added_tokens") or []:
        reverse[int(at["id"])] = at["content"]
        added[int(at["id"])] = at
    if reverse and max(reverse) >= vocab_size:
        raise fail(
            f"write the GGUF vocabulary: the tokenizer has token id {max(reverse)} but the config's vocab_size is {vocab_size}",
            "resize the model's embeddings to the tokenizer (model.resize_token_embeddings) before exporting", SEE,
        )
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        t = reverse[i]
        if i in added:
            if added[i].get("special") or _looks_special(t):
                types.append(gguf.TokenType.CONTROL)
            else:
                t = t.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(t)
    return tokens, types


def sp_vocab(tok: TokenizerFiles, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """SentencePiece vocabulary as llama.cpp's converter builds it (_create_vocab_sentencepiece)."""
    pieces = read_sentencepiece_model(tok.file("tokenizer.model"))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i, (piece, score, typ) in enumerate(pieces):
        if i >= vocab_size:
            break
        tokens[i] = piece.encode("utf-8")
        scores[i] = score
        types[i] = typ
    added_file = tok.file("added_tokens.json")
    if added_file.is_file():
        for key, tid in json.loads(added_file.read_text(encoding="utf-8")).items():
            if tid < vocab_size:
                tokens[tid] = key.encode("utf-8")
                scores[tid] = -1000.0
                types[tid] = USER_DEFINED
    for tid_s, data in (tok.config.get("added_tokens_decoder") or {}).items():
        tid = int(tid_s)
        if tid >= vocab_size:
            continue
        t = data["content"]
        if data.get("special") or _looks_special(t):
            types[tid] = CONTROL
        else:
            t = t.replace("\u2581", " ")
            types[tid] = USER_DEFINED
        scores[tid] = -1000.0
        tokens[tid] = t.encode("utf-8")
    return tokens, scores, types


def add_vocab(writer: Any, info: VocabInfo, tok: TokenizerFiles, hf_config: dict, fam: Family) -> None:
    """Write the tokenizer keys: model, pre-tokenizer, tokens, scores/types, merges, special ids."""
    import gguf

    vocab_size = int(hf_config["vocab_size"])
    if info.kind == "gpt2":
        tokens, types = bpe_vocab(tok, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(info.pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(tok.path, load_merges=True, n_vocab=vocab_size)
    else:
        tokens_b, scores, types = sp_vocab(tok, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens_b)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        if fam.add_space_prefix is not None:
            writer.add_add_space_prefix(fam.add_space_prefix)
        elif isinstance(tok.config.get("add_prefix_space"), bool):
            writer.add_add_space_prefix(tok.config["add_prefix_space"])
        special = gguf.SpecialVocab(tok.path, n_vocab=vocab_size)
        # without tokenizer.json SpecialVocab cannot resolve tokenizer_config's token strings: use the pieces
        index = {t: i for i, t in reversed(list(enumerate(tokens_b)))}
        for typ in ("bos", "eos", "unk", "pad"):
            entry = tok.config.get(f"{typ}_token")
            content = entry.get("content") if isinstance(entry, dict) else entry
            if isinstance(content, str) and typ not in special.special_token_ids and content.encode() in index:
                special.special_token_ids[typ] = index[content.encode()]
    # ids the tokenizer files do not name come from the model config
    for typ in ("bos", "eos", "pad", "unk"):
        tid = hf_config.get(f"{typ}_token_id")
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        if typ not in special.special_token_ids and isinstance(tid, int) and 0 <= tid < vocab_size:
            special.special_token_ids[typ] = tid
    special.add_to_gguf(writer, quiet=True)
