"""Stage 2, the strategy: small pure functions from named source tensors to a plan.

They see names, shapes and dtypes only and return :class:`~converter.plan.PlannedTensor`
lists whose ``produce`` reads the few source tensors each output needs (LoRA merges,
experts, renames, layouts). Submodules are imported by name; this file imports nothing.
"""
