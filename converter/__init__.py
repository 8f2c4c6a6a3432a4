"""efexport: turn fine-tuning runs into shippable, verified artifacts.

``from converter import load_model`` loads a training run; ``converter.runtime`` is the
import-light loader for exported artifacts; the ``efexport`` command exports.

``load_model`` is imported on first use (PEP 562), so ``import converter.runtime`` does
not pull in run resolution and the strategy stack.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .errors import EfexportError
from .loaded import LoadedModel, ModelMetadata

__all__ = ["EfexportError", "LoadedModel", "ModelMetadata", "load_model", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from .loader import load_model

        return load_model
    raise AttributeError(f"module 'converter' has no attribute {name!r}")
