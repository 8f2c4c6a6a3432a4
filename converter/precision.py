"""Precision stage: cast or quantize planned tensors, one at a time.

Quantization uses efexport's encoders (:mod:`converter.encoders`), which write byte for
byte what bitsandbytes' CPU path writes when ``Params4bit._quantize`` and
``Int8Params._quantize`` call it, so the bytes equal what transformers produces when it
quantizes the same weights (only faster, on every core); the tensor names are the ones
transformers writes for a bitsandbytes model (``save_pretrained``). Shapes of every output
are known before any data is read, except the small JSON blob of a 4-bit quant state,
whose planned shape is an upper bound (the writer records the real one).
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import torch

from .encoders import BLOCKSIZE as BLOCKSIZE_4BIT
from .encoders import NESTED_BLOCKSIZE, encode_int8, encode_nf4
from .errors import fail
from .plan import PlannedTensor, TensorPlan
from .quiet import quiet_libraries

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SEE_PRECISION = "docs: README.md#precisions"


def bnb_config(precision: str, skip_modules: list[str] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` block transformers writes for efexport's BitsAndBytesConfig (NF4 + double quant, bf16 compute; LLM.int8)."""
    four = precision == "int4"
    return {
        "_load_in_4bit": four,
        "_load_in_8bit": not four,
        "bnb_4bit_compute_dtype": "bfloat16" if four else "float32",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4" if four else "fp4",
        "bnb_4bit_use_double_quant": four,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": four,
        "load_in_8bit": not four,
        "quant_method": "bitsandbytes",
    }


def quantization_record(precision: str | None) -> dict[str, Any] | None:
    """What efexport.json says about quantization."""
    if precision == "int4":
        return {"method": "bitsandbytes", "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    if precision == "int8":
        return {"method": "bitsandbytes", "quant_type": "llm_int8", "double_quant": False, "compute_dtype": "float16"}
    return None


def require_bitsandbytes(precision: str | None, run_it: bool = True) -> None:
    """Fail early, in the three-line form, when a quantized precision cannot run here.

    ``run_it=False`` (an export that never runs the quantized model: ``--no-verify``) only
    checks that the package is installed: efexport's own encoders write the bytes, and
    importing bitsandbytes costs seconds.
    """
    if precision not in ("int4", "int8"):
        return
    try:
        if not run_it:
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                raise ImportError("bitsandbytes")
            return
        with quiet_libraries():  # the first import logs about optional kernels
            import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        raise fail(
            f"quantize to {precision}: bitsandbytes is not available ({type(exc).__name__})",
            "pip install bitsandbytes (>= 0.48 runs int4/int8 on CPU too), or choose fp32/fp16/bf16.",
            SEE_PRECISION,
        ) from None


def check_precision(precision: str | None) -> str | None:
    if precision is None or precision in ("", "none", "auto"):
        return None
    if precision not in PRECISIONS:
        raise fail(
            f"use precision {precision!r}: expected one of {', '.join(PRECISIONS)} (or none to keep the source dtype)",
            "pass --precision fp32|fp16|bf16|int8|int4.",
            SEE_PRECISION,
        )
    return precision


def base_dtype(precision: str | None) -> torch.dtype | None:
    """dtype of every non-quantized float tensor; bnb precisions keep them in bfloat16."""
    if precision is None:
        return None
    return FLOAT_DTYPES.get(precision, torch.bfloat16)


# -- quantizers (bitsandbytes' bytes, see converter/encoders.py) ------------------
def quantize_nf4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """NF4 + double quant, bf16 input, as Params4bit._quantize does it; keys without the 'weight' prefix."""
    return encode_nf4(weight.contiguous())


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8 row-wise as Int8Params._quantize does it: (int8 weight, SCB).

    Quantized artifacts are "the bf16 export, quantized": the weight is rounded to bf16
    first (as transformers sees it when loading a bf16 folder), then to fp16 for bnb.
    """
    return encode_int8(weight.contiguous())


def _nf4_blob_bound(shape: tuple[int, ...]) -> int:
    worst = {
        "quant_type": "nf4", "blocksize": BLOCKSIZE_4BIT, "dtype": "bfloat16", "shape": list(shape),
        "nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": -1.2345678901234567e-300,
    }
    return len(json.dumps(worst)) + 16


def _memo(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Share one quantization between the several tensors it yields, then forget it."""
    cell: dict[str, Any] = {}

    def get(take: str) -> Any:
        if "value" not in cell:
            cell["value"] = fn()
            cell["left"] = set(cell["value"])
        value = cell["value"][take]
        cell["left"].discard(take)
        if not cell["left"]:
            cell.clear()
        return value

    return get


def _cast(t: PlannedTensor, dtype: torch.dtype) -> PlannedTensor:
    if not t.dtype.is_floating_point or t.dtype == dtype:
        return t
    rows = t.produce_rows if t.produce_f32 is None else None
    return PlannedTensor(t.name, t.shape, dtype, lambda: t.produce_exact().to(dtype),
                         produce_rows=(lambda start, stop: rows(start, stop).to(dtype)) if rows else None)


def apply_precision(
    plan: TensorPlan, precision: str | None, quantizable: set[str], keep_dtype: Callable[[str], bool] = lambda n: False,
    float_dtype: torch.dtype | None = None,
) -> TensorPlan:
    """Map each planned tensor to its cast or quantized form(s).

    ``quantizable``: names of Linear weights bitsandbytes would quantize (decided from the
    target architecture, see sinks). ``keep_dtype(name)``: tensors left as the run had them
    (routers and LoRA factors of compact layouts). ``float_dtype`` overrides the dtype of
    the non-quantized float tensors (the loader's ``dtype=`` argument).
    """
    dtype = float_dtype or base_dtype(precision)
    if dtype is None:
        return list(plan)
    out: TensorPlan = []
    for t in plan:
        if keep_dtype(t.name):
            out.append(t)
        elif precision == "int4" and t.name in quantizable:
            numel = math.prod(t.shape)
            blocks = math.ceil(numel / BLOCKSIZE_4BIT)
            get = _memo(lambda t=t: quantize_nf4(t.produce_exact()))
            shapes = {
                "": ((numel + 1) // 2, 1),
                ".absmax": (blocks,),
                ".nested_absmax": (math.ceil(blocks / NESTED_BLOCKSIZE),),
                ".nested_quant_map": (256,),
                ".quant_map": (16,),
                ".quant_state.bitsandbytes__nf4": (_nf4_blob_bound(t.shape),),
            }
            dtypes = {"": torch.uint8, ".absmax": torch.uint8, ".quant_state.bitsandbytes__nf4": torch.uint8}
            for suffix, shape in shapes.items():
                out.append(PlannedTensor(t.name + suffix, shape, dtypes.get(suffix, torch.float32),
                                         lambda g=get, s=suffix: g(s)))
        elif precision == "int8" and t.name in quantizable:
            prefix = t.name[: -len("weight")]
            get = _memo(lambda t=t: dict(zip(("cb", "scb"), quantize_int8(t.produce_exact()))))
            out.append(PlannedTensor(t.name, t.shape, torch.int8, lambda g=get: g("cb")))
            out.append(PlannedTensor(prefix + "SCB", (t.shape[0],), torch.float32, lambda g=get: g("scb")))
            out.append(PlannedTensor(prefix + "weight_format", (), torch.uint8,
                                     lambda: torch.tensor(0, dtype=torch.uint8)))
        else:
            out.append(_cast(t, dtype))
    return out

