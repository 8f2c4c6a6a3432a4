"""Stage 1, the source: what the user pointed at, read lazily (JSON and headers first, tensors on demand).

Nothing here knows a strategy: run folders, checkpoint folders, PEFT adapter folders and
plain Hugging Face folders are described (:mod:`.resolve`) and their tensors read one at a
time (:mod:`.safetensors`). Submodules are imported by name; this file imports nothing.
"""
