"""Stage 4, the sinks: one object per output format, each consuming a plan tensor by tensor.

``model`` builds an in-memory model, ``safetensors`` writes (sharded) safetensors, ``peft``
a PEFT adapter, ``gguf`` a llama.cpp file. Submodules are imported by name; this file
imports nothing.
"""
