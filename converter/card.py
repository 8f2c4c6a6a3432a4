"""Model card (README.md): YAML front matter from huggingface_hub, body from Jinja.

The front matter is serialised by ``ModelCardData`` (never pasted together as text),
so it always parses on the Hub. The body comes from ``templates/model_card.md.jinja``
shipped in the wheel, or from a user ``--template`` rendered in a sandbox with
``StrictUndefined`` (a typo in a user template is an error, not an empty string).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from .errors import fail

DEFAULT_TEMPLATE = "model_card.md.jinja"
SEE = "docs: README.md#model-cards"
SHORT_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
GATED = (None, "fp32", "fp16", "bf16")  # converter.parity.TOLERANCE: float exports are gated, quantized ones recorded


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def default_template_text() -> str:
    """The shipped template, found through importlib.resources (converter.templates in the wheel).

    Running from a source checkout (converter/ imported from the working directory) the
    package-dir mapping does not apply, so fall back to the checkout's templates/ folder.
    """
    try:
        return resources.files("converter.templates").joinpath(DEFAULT_TEMPLATE).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        checkout = Path(__file__).resolve().parent.parent / "templates" / DEFAULT_TEMPLATE
        return checkout.read_text(encoding="utf-8")


def load_template(path: Path | None):
    """Compile the template now, so a broken user template fails before any export work."""
    from jinja2 import StrictUndefined, TemplateSyntaxError
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)
    if path is None:
        return env.from_string(default_template_text())
    path = Path(path)
    if not path.is_file():
        raise fail(f"read template {path}: no such file", "pass --template PATH to an existing Jinja file.", SEE)
    try:
        return env.from_string(path.read_text(encoding="utf-8"))
    except TemplateSyntaxError as exc:
        raise fail(f"compile template {path.name}: {exc.message} (line {exc.lineno})", "fix the template's Jinja syntax.", SEE) from None


def card_data(record: dict[str, Any], license: str | None = None) -> str:
    """YAML front matter for the Hub: base_model, library_name, pipeline_tag, tags, license."""
    from huggingface_hub import ModelCardData

    tags = ["efexport", record["strategy"], record["precision"] or SHORT_DTYPES.get(record.get("dtype") or ""),
            record["layout"]]
    if record["layout"] == "gguf":
        tags.insert(0, "gguf")
    if record.get("backbone"):
        tags.append(record["backbone"])
    data = ModelCardData(
        base_model=record.get("base_model") or None,
        library_name="gguf" if record["layout"] == "gguf" else ("peft" if record["layout"] == "peft_adapter" else "transformers"),
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(t for t in tags if t)),
        license=license,
    )
    return data.to_yaml()


def render_card(template, record: dict[str, Any], *, license: str | None = None, repo_ref: str = "path/to/this/folder",
                title: str | None = None, extra: dict[str, Any] | None = None) -> str:
    """The whole README.md: front matter + rendered body."""
    from jinja2 import TemplateError

    context = {
        **record,
        "title": title or (record["source"].get("run_name") or "efexport artifact"),
        "layout_text": layout_text(record),
        "parameters_text": parameters_text(record),
        "parity_text": parity_text(record),
        "parity_gate": parity_gate(record),
        "summary": f"A `{record['strategy']}` fine-tune exported by efexport as a `{record['layout']}` artifact.",
        "source_kind_text": {"eulerforge_run": "EulerForge run", "peft_adapter": "PEFT adapter",
                             "hf_model": "Hugging Face model"}.get(record["source"]["kind"], record["source"]["kind"]),
        "run_name": record["source"].get("run_name"),
        "checkpoint": record["source"].get("checkpoint"),
        "step": record["source"].get("step"),
        "precision_text": precision_text(record),
        "files": [{"name": k, "size_text": human_size(v["size"]), **v} for k, v in record["files"].items()],
        "efexport_version": record["created_with"]["efexport"],
        "repo_ref": repo_ref,
        "repo_name": repo_ref.rsplit("/", 1)[-1],
        "gguf_file": next((k for k in record["files"] if k.endswith(".gguf")), ""),
        "vocabulary": record.get("vocabulary") or {},
        "vocabulary_notes": vocabulary_notes(record),
        **(extra or {}),
    }
    try:
        body = template.render(**context)
    except TemplateError as exc:  # undefined variable (StrictUndefined) or a sandbox violation
        raise fail(f"render the model card: {exc.message}", "use only the documented template variables.", SEE) from None
    return f"---\n{card_data(record, license)}\n---\n\n{body.lstrip()}"


def precision_text(record: dict[str, Any]) -> str:
    """'int4 (bitsandbytes nf4, double quant, bfloat16 compute)', 'q4_k_m (GGUF Q4_K_M: 13 Q5_0, ...)', 'float32'."""
    precision, q, dtype = record["precision"], record.get("quantization"), record.get("dtype")
    if q and q.get("method") == "gguf":
        mix = ", ".join(f"{n} {t}" for t, n in (q.get("tensor_types") or {}).items())
        return f"{precision} (GGUF {q.get('file_type')}" + (f"; tensors: {mix}" if mix else "") + ")"
    if q:
        return (f"{precision} (bitsandbytes {q['quant_type']}{', double quant' if q.get('double_quant') else ''}, "
                f"{q['compute_dtype']} compute)")
    if precision is None:
        return f"{dtype} (kept from the source)" if dtype else "the source's dtype"
    return precision


def layout_text(record: dict[str, Any]) -> str:
    if record["layout"] == "peft_adapter":
        return "LoRA factors as trained, not merged"
    return "structure preserved" if record.get("structure_preserved") else "merged, dense"


def parameters_text(record: dict[str, Any]) -> str:
    n = record.get("num_parameters")
    if not n:
        return "unknown"
    return f"{n:,}" + (" (the adapter's LoRA factors)" if record["layout"] == "peft_adapter" else "")


def vocabulary_notes(record: dict[str, Any]) -> list[str]:
    """What a resized vocabulary or untied embeddings change for the user (``record["vocabulary"]``)."""
    v, notes = record.get("vocabulary") or {}, []
    if v.get("size"):
        notes.append(f"The vocabulary was resized from {v['base_size']:,} to {v['size']:,} rows for tokens added in "
                     "training; the tokenizer shipped here has them, with their special flags and chat template.")
        if record["layout"] == "peft_adapter":
            notes.append("The adapter carries the whole embedding and head (`modules_to_save`): resize the base to "
                         "the tokenizer (`base.resize_token_embeddings(len(tokenizer))`) before "
                         "`PeftModel.from_pretrained`.")
            notes.append("vLLM needs the new tokens' embedding in the adapter in a form its LoRA loader takes, or a "
                         "merged model: serve a merged export (`--format hf`) of this run with vLLM.")
    if v.get("untied"):
        notes.append("The base ties its output head to its input embedding; the adapter trains them as separate "
                     "layers (`modules_to_save`), so this model keeps them apart (`tie_word_embeddings: false`), "
                     "as PEFT's `merge_and_unload()` does.")
    return notes


def parity_gate(record: dict[str, Any]) -> str:
    """Whether the figures were a pass/fail check or a record (quantized exports), in words."""
    parity, precision = record.get("parity") or {}, record["precision"]
    if parity.get("skipped"):
        return ""
    if record.get("layout") == "peft_adapter":  # an adapter on its base weights must match to float32 error
        return "within the fp32 tolerance, checked at export"
    if precision in GATED:
        return f"within the {precision or SHORT_DTYPES.get(record.get('dtype') or '', 'source-dtype')} tolerance, checked at export"
    return (f"recorded, not gated: {precision} quantization changes logits by design, these figures say by how much")


def parity_text(record: dict[str, Any]) -> str:
    """max |Δlogit| with what it is relative to, and top-1 agreement, rounded as the export prints them."""
    p = record.get("parity") or {}
    if p.get("skipped"):
        return f"not measured: {p['skipped']}"
    diff, scale = p["max_abs_logit_diff"], p.get("max_abs_logit") or 0.0
    rel = f" ({100 * diff / scale:.3g}% of the source's max |logit| {scale:.3g})" if scale else ""
    return f"max |Δlogit| {diff:.3g}{rel}, top-1 agreement {100 * p['top1_agreement']:.1f}%"
