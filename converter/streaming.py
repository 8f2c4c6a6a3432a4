"""Logits one decoder layer at a time: a model's probe logits without ever holding it whole.

The model is built on the meta device and runs its own forward, with every decoder layer
swapped for a stand-in. A first pass (embedding only) records, per probe prompt, what each
layer is called with (hidden state, masks, rotary tables, cache). Then each layer's
tensors are produced, the layer runs on every prompt's hidden state, and its weights go
back to the meta device. A last pass feeds the final hidden states through the final norm
and head. Every module computes exactly what it computes in the whole model, so the
logits are the same numbers, while memory holds one layer at a time (each layer's tensors
are produced once for all prompts). The vocabulary matrices never come whole when their
rows can be read on their own: the embedding holds only the rows of the probe ids, and
the head runs a block of vocabulary rows at a time (a tied 151,936 x 2,048 head is
1.2 GB in float32, several decoder layers' worth).

Used for the parity check at export (the source run and the written artifact) and by
``efexport verify``.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from .errors import fail
from .hf_model import meta_model
from .memory import release_free_memory
from .plan import PlannedTensor, numel
from .sinks.model import assign, materialise_buffers

SEE = "docs: README.md#parity"
# Vocabulary rows of the head per matmul: 16,384 x 4,096 float32 is 256 MiB at 8B.
HEAD_ROWS = 16384


class _Captured(Exception):
    """Raised by the last stand-in once every layer's call has been recorded."""


class _StandIn(nn.Module):
    """Takes a decoder layer's place: records its call, or passes the hidden state through."""

    def __init__(self, index: int, last: bool, calls: list) -> None:
        super().__init__()
        self.index, self.last, self.calls = index, last, calls
        self.recording = True

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.recording:
            self.calls.append((hidden_states, args, kwargs))
            if self.last:
                raise _Captured
        return hidden_states


class _RowsHead(nn.Module):
    """The output head a block of vocabulary rows at a time, each block read once for every prompt.

    A first pass over the prompts records what the head is called with; :meth:`compute`
    multiplies each block of rows with every recorded input (a logit is one row times the
    input, so splitting the rows changes no sum); a second pass hands the logits back, so the
    model's own code still applies whatever follows the head (e.g. Gemma's soft-capping).
    """

    def __init__(self, rows: Callable[[int, int], torch.Tensor], vocab: int) -> None:
        super().__init__()
        self.rows, self.vocab = rows, vocab
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.outputs:
            return self.outputs.pop(0)
        self.inputs.append(hidden)
        return hidden[..., :0]

    def compute(self) -> None:
        parts: list[list[torch.Tensor]] = [[] for _ in self.inputs]
        for start in range(0, self.vocab, HEAD_ROWS):
            block = self.rows(start, min(start + HEAD_ROWS, self.vocab))
            for part, hidden in zip(parts, self.inputs):
                part.append(F.linear(hidden, block))
        self.outputs, self.inputs = [torch.cat(part, dim=-1) for part in parts], []


class Streamed:
    """A meta-device model plus the planned tensors that fill it, run a layer at a time."""

    def __init__(self, model: nn.Module, plan: Iterable[PlannedTensor], precision: str | None = None,
                 quantized: set[str] | None = None) -> None:
        self.model = model
        self.precision, self.quantized = precision, quantized or set()
        self.layers: nn.ModuleList = model.model.layers
        prefix = _name_of(model, self.layers) + "."
        embed = _name_of(model, model.get_input_embeddings()) + "."
        self.groups: dict[Any, list[PlannedTensor]] = {"embed": [], "head": []}
        for i in range(len(self.layers)):
            self.groups[i] = []
        for t in plan:
            if t.name.startswith(prefix):
                self.groups[int(t.name[len(prefix):].split(".", 1)[0])].append(t)
            else:
                self.groups["embed" if t.name.startswith(embed) else "head"].append(t)
        self.tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
        if self.tied:  # the head is the embedding: produce it again for the last pass
            self.groups["head"] = self.groups["head"] + self.groups["embed"]
        # the vocabulary matrices, when they can be read a few rows at a time
        self.embed = _rows_of(self.groups["embed"], embed + "weight", self.quantized)
        head = model.get_output_embeddings()
        head_name = embed + "weight" if self.tied else _name_of(model, head) + ".weight"
        plain = isinstance(head, nn.Linear) and head.bias is None
        self.head = _rows_of(self.groups["head"], head_name, self.quantized) if plain else None

    @property
    def config(self) -> Any:
        return self.model.config

    @torch.no_grad()
    def logits(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Float32 logits per [1, T] batch, as ``model(input_ids=b).logits`` of the whole model gives them."""
        model, layers = self.model, self.layers
        real = list(layers)
        calls: list[list] = [[] for _ in batches]
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        meta_rows = embedding.weight  # the whole vocabulary's shape, on meta
        try:
            batches = self._load_embedding(batches)
            for k, batch in enumerate(batches):
                for i, stand_in in enumerate(self._stand_ins(calls[k])):
                    layers[i] = stand_in
                try:
                    model(input_ids=batch)
                except _Captured:
                    pass
            _to_meta(model)
            embedding.weight = meta_rows
            release_free_memory()
            hidden = [c[0][0] for c in calls]
            for i, layer in enumerate(real):
                layers[i] = layer
                self._load(i)
                for k in range(len(batches)):
                    _, args, kwargs = calls[k][i]
                    hidden[k] = layer(hidden[k], *args, **kwargs)
                _to_meta(layer)
                release_free_memory()
                layers[i] = _StandIn(i, False, [])
            del calls
            for stand_in in layers:
                stand_in.recording = False
            self._load("head")
            rows_head = model.get_output_embeddings()
            if isinstance(rows_head, _RowsHead):
                for h in hidden:
                    model(inputs_embeds=h)
                rows_head.compute()
            return [model(inputs_embeds=h).logits.float().cpu() for h in hidden]
        finally:
            for i, layer in enumerate(real):
                layers[i] = layer
            model.set_output_embeddings(head)
            embedding.weight = meta_rows
            _to_meta(model)

    def _stand_ins(self, calls: list) -> list[_StandIn]:
        n = len(self.layers)
        return [_StandIn(i, i == n - 1, calls) for i in range(n)]

    def _load_embedding(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Fill the embedding; returns the batches to feed it (ids renumbered when only their rows are held)."""
        if self.embed is None:
            self._load("embed")
            return batches
        assign(self.model, [t for t in self.groups["embed"] if t is not self.embed], self.precision, self.quantized)
        ids = torch.unique(torch.cat([b.flatten() for b in batches]))
        rows = torch.cat([self.embed.produce_rows(int(i), int(i) + 1) for i in ids])
        self.model.get_input_embeddings().weight = nn.Parameter(rows, requires_grad=False)
        return [torch.searchsorted(ids, b) for b in batches]

    def _load(self, group: Any) -> None:
        part = self.model if not isinstance(group, int) else self.layers[group]
        chunked = group == "head" and self.head is not None
        plan = [t for t in self.groups[group] if t is not self.head] if chunked else self.groups[group]
        assign(self.model, plan, self.precision, self.quantized)
        part.eval()  # bitsandbytes modules just built start in training mode, which computes differently
        if chunked:
            self.model.set_output_embeddings(_RowsHead(self.head.produce_rows, self.head.shape[0]))
        elif group == "head" and self.tied:
            self.model.tie_weights()
        missing = [n for n, p in part.named_parameters() if p.is_meta]
        if isinstance(group, int) and missing:
            raise fail(
                f"run decoder layer {group}: {len(missing)} tensors are missing, e.g. {', '.join(missing[:3])}",
                "the checkpoint is incomplete or does not match its config; re-save it from the training run.",
                SEE,
            )


def streamed_model(hf_config: dict[str, Any], structure: dict[str, Any] | None, plan: Iterable[PlannedTensor],
                   precision: str | None = None, quantized: set[str] | None = None) -> Streamed:
    """The model of ``hf_config`` (and structure) on meta, its buffers filled, ready to stream ``plan`` through."""
    model = meta_model(hf_config, structure)
    materialise_buffers(model)
    return Streamed(model.eval(), plan, precision, quantized)


@contextmanager
def artifact_stream(folder: Path) -> Iterator[Streamed]:
    """A dense, moe or compact artifact folder as a :class:`Streamed` (its files read per layer).

    Tensors are taken as ``load_artifact`` takes them: bitsandbytes int8/int4 Linears from
    their stored quant states, float tensors in the config's dtype for dense/moe (as
    ``from_pretrained(dtype="auto")``), as stored for compact layouts.
    """
    from .modules import STRUCTURE_KEY
    from .runtime import is_quant_tensor, quantized_modules
    from .source.safetensors import TensorSource

    config = json.loads((Path(folder) / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("quantization_config", "auto_map")}
    structure = config.get(STRUCTURE_KEY)
    dtype = None if structure is not None else getattr(torch, str(config.get("dtype") or ""), None)
    with TensorSource(Path(folder)) as source:
        precision, quantized = quantized_modules(source)
        if precision is not None:
            import bitsandbytes  # noqa: F401  (only quantized artifacts need it)
        plan = []
        for name in source.names:
            stored = source.dtype(name)
            cast = (isinstance(dtype, torch.dtype) and stored.is_floating_point and stored != dtype
                    and not is_quant_tensor(name, quantized))
            plan.append(PlannedTensor(name, source.shape(name), dtype if cast else stored,
                                      (lambda n=name, c=cast: source.get(n).to(dtype) if c else source.get(n)),
                                      produce_rows=(lambda a, b, n=name, c=cast: source.get_rows(n, a, b).to(
                                          dtype if c else source.dtype(n)))))
        model = meta_model(config, structure)
        materialise_buffers(model)
        yield Streamed(model.eval(), as_model_names(plan, model), precision, quantized)


# Per-expert names as written (and as Mixtral/Qwen-MoE checkpoints on the Hub have them).
_EXPERT = re.compile(r"^(?P<pre>.+)\.(?:block_sparse_moe|mlp)\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_HALF = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}


def as_model_names(plan: list[PlannedTensor], model: nn.Module) -> list[PlannedTensor]:
    """The plan under the names the in-memory model has, converted as transformers' loader converts them.

    transformers keeps MoE experts fused (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj``
    [E, H, I]) and renames Mixtral's ``block_sparse_moe`` to ``mlp``; files keep one Linear per expert.
    Stacking and concatenation are exact, so the result is the tensor from_pretrained builds.
    """
    keys = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    out: list[PlannedTensor] = []
    experts: dict[str, dict[int, dict[int, PlannedTensor]]] = {}
    for t in plan:
        m = _EXPERT.match(t.name)
        fused = m and f"{m['pre']}.mlp.experts.gate_up_proj" in keys and t.name not in keys
        if fused:
            experts.setdefault(f"{m['pre']}.mlp.experts", {}).setdefault(_HALF[m["proj"]], {})[int(m["e"])] = t
        elif t.name not in keys and t.name.replace(".block_sparse_moe.", ".mlp.") in keys:
            out.append(PlannedTensor(t.name.replace(".block_sparse_moe.", ".mlp."), t.shape, t.dtype, t.produce))
        else:
            out.append(t)
    for prefix, halves in experts.items():
        members = [[halves.get(h, {}).get(e) for e in range(len(halves.get(h, {})))] for h in range(3)]
        if any(not group or None in group for group in members):
            raise fail(f"run {prefix}: some expert tensors are missing", "re-export the artifact.", SEE)
        gate, up, down = members
        out.append(PlannedTensor(f"{prefix}.gate_up_proj", (len(gate), 2 * gate[0].shape[0], gate[0].shape[1]),
                                 gate[0].dtype, lambda g=gate, u=up: torch.cat(
                                     [torch.stack([t.produce() for t in g]), torch.stack([t.produce() for t in u])], dim=1)))
        out.append(PlannedTensor(f"{prefix}.down_proj", (len(down), *down[0].shape), down[0].dtype,
                                 lambda d=down: torch.stack([t.produce() for t in d])))
    return out


def _rows_of(group: list[PlannedTensor], name: str, quantized: set[str]) -> PlannedTensor | None:
    """The planned 2-D float tensor ``name`` if its rows can be produced on their own, else None."""
    t = next((t for t in group if t.name == name), None)
    ok = t is not None and t.produce_rows is not None and len(t.shape) == 2 and name not in quantized
    return t if ok else None


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise fail("run the model a layer at a time: its decoder layers were not found",
               "export with --no-verify, and report this architecture.", SEE)


def _to_meta(module: nn.Module) -> None:
    """Every parameter back on the meta device (buffers stay: they are small and computed, not loaded)."""
    for m in module.modules():
        for key, p in list(m._parameters.items()):
            if p is not None and not p.is_meta:
                m._parameters[key] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)


def plan_unit_bytes(plan: Iterable[PlannedTensor], itemsize: int | None = None) -> int:
    """Largest layer (by ``layers.<i>.`` in the name), or everything else, in bytes (at ``itemsize`` if given)."""
    sizes: dict[str, int] = {}
    for t in plan:
        parts = t.name.split(".")
        key = next((p for a, p in zip(parts, parts[1:]) if a == "layers" and p.isdigit()), "rest")
        sizes[key] = sizes.get(key, 0) + (numel(t.shape) * itemsize if itemsize else t.nbytes)
    return max(sizes.values(), default=0)
