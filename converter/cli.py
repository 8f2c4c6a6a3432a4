"""The ``efexport`` command.

``efexport RUN [options]`` exports (the positional form users type); ``inspect``,
``verify`` and ``push`` are subcommands beside it. Errors print as the three lines
Cannot / Fix / See, without a traceback (``--debug`` shows it), and exit with 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from .errors import EfexportError

EXAMPLES = """
\b
Examples:
  efexport runs/run_20260311 --checkpoint best --precision int4 --out qwen3-int4
  efexport runs/run_20260311 --out qwen3-bf16 --precision bf16 --push-to-hub me/qwen3-ft
  efexport runs/run_20260311 --format gguf --precision q4_k_m --out qwen3-gguf
  efexport runs/run_20260311 --format peft --out qwen3-adapter
  efexport adapter_dir --base-model Qwen/Qwen3-0.6B --out merged
  efexport inspect runs/run_20260311
  efexport verify qwen3-int4
  efexport push qwen3-int4 me/qwen3-ft-int4
"""


class ExportFirstGroup(click.Group):
    """A group whose default command is ``export``: ``efexport RUN ...`` == ``efexport export RUN ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["export", *args]
        elif args and args[0].startswith("-") and args[0] not in ("--help", "-h", "--version"):
            args = ["export", *args]
        return super().parse_args(ctx, args)


def _quiet_libraries(quiet: bool) -> None:
    """transformers' own progress bars and warnings would interleave with ours."""
    import logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")


def _emit(data: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(text)


def _hub_options(f):
    for option in reversed([
        click.option("--private", is_flag=True, help="Create the Hub repo as private."),
        click.option("--revision", default=None, help="Branch to push to (created from main when missing)."),
        click.option("--commit-message", default=None, help="Commit message for the upload."),
        click.option("--token", default=None, help="Hub token (default: HF_TOKEN, then the cached `hf auth login`)."),
        click.option("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT, then huggingface.co)."),
    ]):
        f = option(f)
    return f


@click.group(cls=ExportFirstGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=EXAMPLES)
@click.version_option(package_name="efexport")
def main() -> None:
    """Export a fine-tuning run (EulerForge run, PEFT adapter or HF folder) to a shippable artifact.

    \b
    efexport RUN --out DIR [options]    export (the default command)
    efexport inspect RUN                what a run holds and where it can go
    efexport verify DIR                 check an artifact's hashes and parity
    efexport push DIR REPO_ID           publish an artifact to the Hugging Face Hub

    Run `efexport export --help` for every export option; add --debug to see tracebacks.
    """


@main.command("export", epilog=EXAMPLES)
@click.argument("run", type=click.Path(path_type=str))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Folder to write (created atomically).")
@click.option("--checkpoint", "-c", default="final", show_default=True, help="final | best | latest | N (a step).")
@click.option("--precision", "-p", default=None,
              help="hf: fp32|fp16|bf16|int8|int4 (bitsandbytes). gguf: fp32|fp16|bf16|q8_0|q4_0|q5_0|q4_k_m|q5_k_m|q6_k. "
                   "Default: keep the source dtype.")
@click.option("--format", "fmt", type=click.Choice(["hf", "gguf", "peft"]), default="hf", show_default=True,
              help="hf: safetensors for transformers/vLLM/TGI; gguf: llama.cpp/Ollama/LM Studio; peft: a LoRA adapter.")
@click.option("--moe-layout", type=click.Choice(["native", "compact"]), default=None,
              help="moe_expert_lora: native (Qwen3-MoE / Mixtral, default where possible) or compact (the run's structure).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Split weights into shards of at most this size.")
@click.option("--base-model", default=None, help="Base model (local folder or cached Hub id) for PEFT adapter folders.")
@click.option("--download-base", is_flag=True, help="Allow downloading a PEFT adapter's base model from the Hub.")
@click.option("--template", type=click.Path(path_type=Path), default=None, help="Jinja template for the model card body.")
@click.option("--license", "license_", default=None, help="License id for the model card (e.g. apache-2.0).")
@click.option("--name", default=None, help="Model name used in GGUF file names and metadata.")
@click.option("--force", is_flag=True, help="Replace an existing artifact at --out (only once the new one is complete).")
@click.option("--dry-run", is_flag=True, help="Check everything and print the plan; write nothing.")
@click.option("--no-verify", is_flag=True, help="Skip the parity check after writing.")
@click.option("--push-to-hub", "push_to_hub", default=None, metavar="REPO_ID", help="Publish the artifact to this Hub repo.")
@_hub_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def export_cmd(run: str, out: Path, checkpoint: str, precision: str | None, fmt: str,
               moe_layout: str | None, max_shard_size: str, base_model: str | None, download_base: bool,
               template: Path | None,
               license_: str | None, name: str | None, force: bool, dry_run: bool, no_verify: bool,
               push_to_hub: str | None, private: bool, revision: str | None, commit_message: str | None,
               token: str | None, endpoint: str | None, as_json: bool, quiet: bool) -> None:
    """Export RUN (run dir, checkpoint dir, PEFT adapter or HF folder) to --out."""
    from .export import ExportOptions, PushOptions, export
    from .export.api import PushFailed

    _quiet_libraries(quiet)
    push = None
    if push_to_hub:
        push = PushOptions(repo_id=push_to_hub, token=token, endpoint=endpoint, private=private,
                           revision=revision, commit_message=commit_message)
    opts = ExportOptions(run=run, out=out, checkpoint=checkpoint, precision=precision, fmt=fmt, moe_layout=moe_layout,
                         max_shard_size=max_shard_size, template=template, force=force, dry_run=dry_run,
                         verify=not no_verify, base_model=base_model, download_base=download_base, license=license_, name=name, push=push,
                         progress=not quiet)
    try:
        result = export(opts)
    except PushFailed as exc:
        raise _push_again(exc) from None
    if result.record is None:
        plan = result.plan or {}
        lines = ["Dry run: nothing written."] + [f"  {k}: {v}" for k, v in plan.items()]
        _emit({"dry_run": True, **plan}, as_json, "\n".join(lines))
        return
    record = result.record
    parity = record.get("parity") or {}
    if "skipped" in parity:
        parity_text = f"parity skipped: {parity['skipped']}"
    else:
        parity_text = (f"parity: max |Δlogit| {parity['max_abs_logit_diff']:.3g}, top-1 {100 * parity['top1_agreement']:.1f}% "
                       f"vs {parity['reference']}" + (f" in {parity['engine']}" if parity.get("engine") else ""))
    size = sum(f["size"] for f in record["files"].values())
    text = [f"Wrote {result.out} ({record['layout']}, {record['precision'] or 'source dtype'}, "
            f"{len(record['files']) + 1} files, {size / 1e6:.1f} MB) in {result.seconds:.1f}s", parity_text]
    data = {**record, "out": str(result.out), "seconds": result.seconds}
    if result.push:
        text.append(f"Pushed to {result.push['url']} (commit {result.push['commit_id']})")
        data["push"] = result.push
    _emit(data, as_json, "\n".join(text))


def _push_again(exc: Any) -> EfexportError:
    """A failed --push-to-hub after a complete export: say which `efexport push` publishes it."""
    p, cause = exc.push, exc.cause
    again = (f"efexport push {exc.out} {p.repo_id}" + (f" --revision {p.revision}" if p.revision else "")
             + (f" --endpoint {p.endpoint}" if p.endpoint else "") + (" --private" if p.private else ""))
    fix = cause.fix.replace("re-run the same command", f"run `{again}`")
    if again not in fix:
        fix += f"; then publish it with `{again}` (no need to export again)"
    return EfexportError(f"{cause.cannot} (the export itself is complete at {exc.out})", fix, cause.see)


@main.command("inspect")
@click.argument("run", type=click.Path(path_type=str))
@click.option("--checkpoint", "-c", default="final", show_default=True)
@click.option("--base-model", default=None, help="Base model for PEFT adapter folders.")
@click.option("--json", "as_json", is_flag=True)
def inspect_cmd(run: str, checkpoint: str, base_model: str | None, as_json: bool) -> None:
    """Show what RUN holds: checkpoints, strategy, backbone, LoRA, tensors, sizes and target formats."""
    from .inspect import inspect_run

    _quiet_libraries(True)
    info = inspect_run(run, checkpoint, base_model=base_model)
    lines = [f"{k}: {v}" for k, v in info.items() if not isinstance(v, (dict, list))]
    checkpoints = ", ".join(f"{c['name']} (step {c['step']})" for c in info["checkpoints"]) or "-"
    lines += [f"checkpoints: {checkpoints}"]
    lines += ["size by precision: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in info["size_by_precision"].items())]
    lines += ["formats: " + "; ".join(f"{k}: {v}" for k, v in info["formats"].items())]
    _emit(info, as_json, "\n".join(lines))


@main.command("verify")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--no-parity", is_flag=True, help="Only check file sizes and hashes.")
@click.option("--json", "as_json", is_flag=True)
def verify_cmd(artifact: Path, no_parity: bool, as_json: bool) -> None:
    """Check ARTIFACT's files against efexport.json, reload it and re-measure parity."""
    from .verify import verify_artifact

    _quiet_libraries(True)
    report = verify_artifact(artifact, parity=not no_parity)
    lines = [f"{artifact}: {'OK' if report['ok'] else 'FAILED'}", f"files: {report['files_checked']} checked"]
    if "parity" in report:
        lines.append(f"parity: recorded max |Δlogit| {report['parity']['recorded']}, now {report['parity']['measured']}")
    _emit(report, as_json, "\n".join(lines))
    if not report["ok"]:
        if not as_json and report.get("error"):
            click.echo(report["error"], err=True)
        sys.exit(1)


@main.command("push")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("repo_id")
@_hub_options
@click.option("--json", "as_json", is_flag=True)
def push_cmd(artifact: Path, repo_id: str, private: bool, revision: str | None, commit_message: str | None,
             token: str | None, endpoint: str | None, as_json: bool) -> None:
    """Publish an exported ARTIFACT to the Hub repo REPO_ID (verified before and after)."""
    from .hub import push_artifact

    result = push_artifact(artifact, repo_id, token=token, endpoint=endpoint, private=private, revision=revision,
                           commit_message=commit_message)
    data = result.to_dict()
    text = f"Pushed {result.files} files to {result.url} (commit {result.commit_id}, verified)"
    if result.deleted:
        text += f"\nRemoved stale files from the repo: {', '.join(result.deleted)}"
    _emit(data, as_json, text)


def run() -> None:
    """Console entry point: three-line errors without traceback, exit code 2."""
    debug = "--debug" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--debug"]
    try:
        main.main(args=args, prog_name="efexport", standalone_mode=False)
    except EfexportError as exc:
        if debug:
            raise
        click.echo(str(exc), err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("Aborted: nothing was written to --out.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Interrupted: nothing was written to --out.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SystemExit:
        raise


if __name__ == "__main__":
    run()
