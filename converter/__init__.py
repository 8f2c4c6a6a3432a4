"""efexport: turn fine-tuning runs into shippable, verified artifacts.

``from converter import load_model`` is seed 000's loader; ``converter.runtime`` is the
import-light loader for exported artifacts; the ``efexport`` command exports.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import EfexportError
from .loader import LoadedModel, ModelMetadata, load_model

__all__ = ["EfexportError", "LoadedModel", "ModelMetadata", "load_model", "__version__"]
