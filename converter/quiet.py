"""Known-harmless messages from libraries, dropped around the calls that cause them.

Only the exact messages listed here, and only inside ``with quiet_libraries():``; every
other warning and log record passes. Nothing is changed process-wide for good: the
filters are removed and the progress-bar setting restored on exit.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

# (logger name, start of the message): bitsandbytes tries an optional CPU kernel package
# (`kernels`) on CPUs with AVX512-BF16 and logs at import when it is absent; its own
# fallback is used, results are the same.
HARMLESS_LOGS = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)
# (category, regex on the message): transformers 5 deprecates an attribute PEFT still reads
# when wrapping a model; bitsandbytes says int8 inputs are cast to float16 (by design).
HARMLESS_WARNINGS = (
    (FutureWarning, r".*is_gradient_checkpointing.* is deprecated"),
    (UserWarning, r".*MatMul8bitLt: inputs will be cast"),
)


class DropKnown(logging.Filter):
    """Drop one logger's records whose message starts with a known prefix."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextmanager
def quiet_libraries(progress_bars: bool = True) -> Iterator[None]:
    """Inside: the messages above are dropped; ``progress_bars=False`` also hides transformers' bars."""
    filters = [(logging.getLogger(name), DropKnown(prefix)) for name, prefix in HARMLESS_LOGS]
    for logger, f in filters:
        logger.addFilter(f)
    restore_bars = _hide_transformers_bars() if not progress_bars else None
    try:
        with warnings.catch_warnings():
            for category, message in HARMLESS_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)
        if restore_bars is not None:
            restore_bars()


def _hide_transformers_bars():
    """transformers' 'Loading weights' bars would interleave with efexport's own; returns the undo."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    return hf_logging.enable_progress_bar if was_enabled else None
