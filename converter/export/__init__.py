"""The exporter: checks, then one format sink writes the plan into a folder that appears atomically.

``from converter.export import ExportOptions, export`` is the API behind ``efexport RUN --out DIR``.
"""

from __future__ import annotations

from .api import ExportResult, export
from .options import ExportOptions, PushOptions

__all__ = ["ExportOptions", "ExportResult", "PushOptions", "export"]
