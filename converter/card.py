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

    tags = ["efexport", record["strategy"], record["precision"] or "source-dtype", record["layout"]]
    if record["layout"] == "gguf":
        tags.insert(0, "gguf")
    if record.get("backbone"):
        tags.append(record["backbone"])
    data = ModelCardData(
        base_model=record.get("base_model") or None,
        library_name="gguf" if record["layout"] == "gguf" else ("peft" if record["layout"] == "peft_adapter" else "transformers"),
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(tags)),
        license=license,
    )
    return data.to_yaml()


def render_card(template, record: dict[str, Any], *, license: str | None = None, repo_ref: str = "path/to/this/folder",
                title: str | None = None, extra: dict[str, Any] | None = None) -> str:
    """The whole README.md: front matter + rendered body."""
    from jinja2 import TemplateError

    precision = record["precision"]
    q = record.get("quantization")
    precision_text = (f"{precision} (bitsandbytes {q['quant_type']}{', double quant' if q.get('double_quant') else ''}, "
                      f"{q['compute_dtype']} compute)" if q else (precision or "source dtype"))
    context = {
        **record,
        "title": title or (record["source"].get("run_name") or "efexport artifact"),
        "summary": f"A `{record['strategy']}` fine-tune exported by efexport as a `{record['layout']}` artifact.",
        "source_kind_text": {"eulerforge_run": "EulerForge run", "peft_adapter": "PEFT adapter",
                             "hf_model": "Hugging Face model"}.get(record["source"]["kind"], record["source"]["kind"]),
        "run_name": record["source"].get("run_name"),
        "checkpoint": record["source"].get("checkpoint"),
        "step": record["source"].get("step"),
        "precision_text": precision_text,
        "files": [{"name": k, "size_text": human_size(v["size"]), **v} for k, v in record["files"].items()],
        "efexport_version": record["created_with"]["efexport"],
        "repo_ref": repo_ref,
        "repo_name": repo_ref.rsplit("/", 1)[-1],
        "gguf_file": next((k for k in record["files"] if k.endswith(".gguf")), ""),
        **(extra or {}),
    }
    try:
        body = template.render(**context)
    except TemplateError as exc:  # undefined variable (StrictUndefined) or a sandbox violation
        raise fail(f"render the model card: {exc.message}", "use only the documented template variables.", SEE) from None
    return f"---\n{card_data(record, license)}\n---\n\n{body.lstrip()}"
