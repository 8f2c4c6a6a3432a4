"""The ``efexport`` command.

``efexport RUN [options]`` exports (the positional form users type); ``inspect``,
``verify`` and ``push`` are subcommands beside it. Errors print as the three lines
Cannot / Fix / See, without a traceback (``--debug`` shows it), and exit with 2.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import click

from .errors import EfexportError
from .quiet import quiet_libraries

STARTED = time.monotonic()

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


def _debug_option(f):
    """Listed in every command's --help; run() reads it from argv, so it works in any position."""
    return click.option("--debug", is_flag=True, expose_value=False,
                        help="Show the Python traceback of an error (for bug reports).")(f)


def command_seconds() -> float:
    """Wall time since the process started (imports included): what the user waited."""
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(stat[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - STARTED


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
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="CPU threads for the whole export (quantizing, merging). Default: all cores.")
@_hub_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@_debug_option
def export_cmd(run: str, out: Path, checkpoint: str, precision: str | None, fmt: str,
               moe_layout: str | None, max_shard_size: str, base_model: str | None, download_base: bool,
               template: Path | None,
               license_: str | None, name: str | None, force: bool, dry_run: bool, no_verify: bool,
               push_to_hub: str | None, private: bool, revision: str | None, commit_message: str | None,
               token: str | None, endpoint: str | None, as_json: bool, quiet: bool, threads: int | None) -> None:
    """Export RUN (run dir, checkpoint dir, PEFT adapter or HF folder) to --out."""
    from .export import ExportOptions, PushOptions, export
    from .export.api import PushFailed

    push = None
    if push_to_hub:
        push = PushOptions(repo_id=push_to_hub, token=token, endpoint=endpoint, private=private,
                           revision=revision, commit_message=commit_message)
    opts = ExportOptions(run=run, out=out, checkpoint=checkpoint, precision=precision, fmt=fmt, moe_layout=moe_layout,
                         max_shard_size=max_shard_size, template=template, force=force, dry_run=dry_run,
                         verify=not no_verify, base_model=base_model, download_base=download_base, license=license_, name=name, push=push,
                         progress=not quiet, threads=threads)
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
    from .card import parity_gate, parity_text

    parity = record.get("parity") or {}
    line = parity_text(record)
    if "skipped" not in parity:
        line += f" vs {parity['reference']}" + (f" in {parity['engine']}" if parity.get("engine") else "")
        line += f"; {parity_gate(record)}"
    size = sum(f["size"] for f in record["files"].values())
    waited = command_seconds()
    text = [f"Wrote {result.out} ({record['layout']}, {record['precision'] or record.get('dtype') or 'source dtype'}, "
            f"{len(record['files']) + 1} files, {size / 1e6:.1f} MB) in {waited:.1f}s", f"parity: {line}"]
    data = {**record, "out": str(result.out), "seconds": result.seconds, "command_seconds": round(waited, 2)}
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
@_debug_option
def inspect_cmd(run: str, checkpoint: str, base_model: str | None, as_json: bool) -> None:
    """Show what RUN holds: checkpoints, strategy, backbone, LoRA, tensors, sizes and target formats."""
    from .inspect import inspect_run

    info = inspect_run(run, checkpoint, base_model=base_model)
    _emit(info, as_json, "\n".join(inspect_lines(info)))


def inspect_lines(info: dict[str, Any]) -> list[str]:
    """The text form of `efexport inspect`: every field --json has, dicts and lists in one line each."""
    lines = [f"{k}: {v}" for k, v in info.items() if not isinstance(v, (dict, list))]
    lora = info.get("lora_config")
    if lora:
        lines.append("lora: " + ", ".join(f"{k.removeprefix('lora_')} {v}" for k, v in lora.items()))
    if info.get("quantization"):
        lines.append("quantization: " + ", ".join(f"{k} {v}" for k, v in info["quantization"].items()))
    if info.get("source"):
        lines.append("made from: " + ", ".join(f"{k} {v}" for k, v in info["source"].items()
                                               if v is not None and k != "weights_sha256"))
    if "checkpoints" in info:
        lines.append("checkpoints: " + (", ".join(f"{c['name']} (step {c['step']})" for c in info["checkpoints"]) or "-"))
    if info.get("size_by_precision"):
        lines.append("size by precision: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in info["size_by_precision"].items()))
    formats = info["formats"]
    if len(set(formats.values())) == 1 and len(formats) > 1:  # an artifact that is no export source
        lines.append(f"formats: {', '.join(formats)}: {next(iter(formats.values()))}")
    else:
        lines.append("formats: " + "; ".join(f"{k}: {v}" for k, v in formats.items()))
    return lines


@main.command("verify")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--no-parity", is_flag=True, help="Only check file sizes and hashes.")
@click.option("--base-model", default=None, help="PEFT adapters: the base model to reload them on (folder or cached Hub id).")
@click.option("--json", "as_json", is_flag=True)
@_debug_option
def verify_cmd(artifact: Path, no_parity: bool, base_model: str | None, as_json: bool) -> None:
    """Check ARTIFACT's files against efexport.json, reload it and re-measure its logits."""
    from .verify import verify_artifact

    with quiet_libraries(progress_bars=False):
        report = verify_artifact(artifact, parity=not no_parity, base_model=base_model)
    _emit(report, as_json, "\n".join(verify_lines(artifact, report)))
    if not report["ok"]:
        if not as_json and report.get("error"):
            click.echo(report["error"], err=True)
        sys.exit(1)


def verify_lines(artifact: Path, report: dict[str, Any]) -> list[str]:
    """What was checked, what was skipped and why, figures rounded as the export printed them."""
    from .card import parity_gate, parity_text

    lines = [f"{artifact}: {'OK' if report['ok'] else 'FAILED'}"]
    if "layout" not in report:
        return lines
    lines.append(f"files: {report['files_checked']} checked (size and sha256 against efexport.json)")
    parity = report.get("parity") or {}
    if parity.get("skipped"):
        lines.append(f"reload: skipped: {parity['skipped']}")
    elif parity:
        lines.append(f"reload: {parity['engine']}, {parity['prompts']} probe prompts: {parity['measured']}")
    recorded = report.get("recorded") or {}
    if recorded and not recorded.get("skipped"):
        record = {"parity": recorded, "precision": report["precision"], "dtype": report.get("dtype"),
                  "layout": report["layout"]}
        lines.append(f"at export: {parity_text(record)} vs {recorded.get('reference')}; {parity_gate(record)}")
    return lines


@main.command("push")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("repo_id")
@_hub_options
@click.option("--json", "as_json", is_flag=True)
@_debug_option
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
        with quiet_libraries(progress_bars=False):
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
    except click.UsageError as exc:
        if debug:
            raise
        click.echo(str(usage_error(exc, args)), err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SystemExit:
        raise


def usage_error(exc: click.UsageError, args: list[str]) -> EfexportError:
    """Click's usage errors in the three-line form, naming the command line the user typed."""
    typed = " ".join(["efexport", *(shlex.quote(a) for a in args)])
    message = exc.format_message().rstrip(".")
    command = exc.ctx.command.name if exc.ctx is not None and exc.ctx.command is not main else None
    see = f"efexport {command} --help" if command else "efexport --help"
    fix = f"see the options below ({see})"
    param = getattr(exc, "param", None)
    if isinstance(exc, click.BadParameter) and param is not None and isinstance(param.type, click.Choice):
        choices = [str(c) for c in param.type.choices]
        name = max(param.opts, key=len) if param.opts else param.name
        given = option_value(args, param.opts)
        close = get_close_matches(given or "", choices, n=1)
        message = f"{name} {given!r} is not one of {', '.join(choices)}" if given is not None else message
        fix = f"pass {name} {'|'.join(choices)}" + (f" (did you mean {name} {close[0]}?)" if close else "")
    elif isinstance(exc, click.MissingParameter) and param is not None:
        if param.param_type_name == "option":
            name = max(param.opts, key=len)
            fix, message = f"add {name} {param.metavar or (param.name or '').upper()}", f"{name} is missing"
        else:
            name = (param.name or "").upper()
            fix, message = f"add {name}", f"the {name} argument is missing"
    elif isinstance(exc, click.NoSuchOption):
        close = exc.possibilities or []
        fix = (f"did you mean {close[0]}? " if close else "") + f"`{see}` lists every option"
        message = f"there is no option {exc.option_name}"
    message = message[:1].lower() + message[1:]
    return EfexportError(f"run `{typed}`: {message}", fix + ".", see)


def option_value(args: list[str], opts: list[str]) -> str | None:
    """The value the user gave an option (``--format x`` or ``--format=x``), last one wins."""
    value = None
    for i, a in enumerate(args):
        for o in opts:
            if a == o and i + 1 < len(args):
                value = args[i + 1]
            elif a.startswith(o + "="):
                value = a[len(o) + 1:]
    return value


if __name__ == "__main__":
    run()
