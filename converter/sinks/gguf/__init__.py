"""GGUF sink: stream a tensor plan into one llama.cpp-ready ``.gguf`` file.

The sink receives a plan in the naming of a standard Hugging Face architecture
(``Qwen3ForCausalLM``, ``Qwen2ForCausalLM``, ``LlamaForCausalLM``, ``MistralForCausalLM``,
``Gemma3ForCausalLM``, ``Gemma2ForCausalLM``, ``Phi3ForCausalLM``, ``Qwen3MoeForCausalLM``,
``MixtralForCausalLM``) plus that architecture's config and
writes it the way llama.cpp's own converter (``convert_hf_to_gguf.py``) would. One
module per job:

* :mod:`.checks` refuses, before any work, anything llama.cpp cannot express exactly
  (three-line :class:`~converter.errors.EfexportError`);
* :mod:`.families` is the table of what each llama.cpp architecture expects (checks,
  rope types, tensor transforms, expert names, hyperparameters), :mod:`.config` the
  plain config readers they share;
* :mod:`.vocab` (with :mod:`.spm` and :mod:`.tokenizer`) writes the tokenizer as
  llama.cpp's converter does;
* :mod:`.tensors` names, types and transforms each tensor (:mod:`.quant`: the GGUF
  types and the per-tensor type rules; :mod:`.kquants`: the type mix, order and keys
  of llama.cpp's K-quant files);
* :mod:`.metadata` writes the key/value metadata, :mod:`.writer` streams the file;
* :mod:`.ggml` quantizes the K-quants' row blocks with llama.cpp's own quantizer and
  :mod:`.llama_cpp` loads files in llama.cpp (llama-cpp-python, loaded lazily: this
  package imports without it); :mod:`.ollama` writes the Modelfile.

See docs/artifact-format.md for what the file holds.
"""

from __future__ import annotations

from .checks import check_gguf_request
from .families import FAMILIES, Family
from .llama_cpp import llama_cpp_available, llama_cpp_logits, llama_cpp_tokenize, llama_cpp_tokenize_all
from .ollama import write_modelfile
from .quant import GGUF_TYPES, K_QUANTS, TYPE_LABELS, default_gguf_type, gguf_filename
from .tokenizer import TokenizerFiles
from .vocab import LLAMA3_PRETOKENIZER_REGEX, QWEN2_PRETOKENIZER_REGEX
from .writer import write_gguf

__all__ = [
    "GGUF_TYPES", "K_QUANTS", "TYPE_LABELS", "FAMILIES", "Family", "TokenizerFiles",
    "QWEN2_PRETOKENIZER_REGEX", "LLAMA3_PRETOKENIZER_REGEX",
    "check_gguf_request", "write_gguf", "write_modelfile", "gguf_filename", "default_gguf_type",
    "llama_cpp_available", "llama_cpp_logits", "llama_cpp_tokenize", "llama_cpp_tokenize_all",
]
