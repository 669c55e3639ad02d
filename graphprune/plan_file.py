"""A run's plan on disk: what was decided, readable as JSON, with the tensors in safetensors.

``<name>.json`` (versioned, human-readable) holds the pipeline, each structured plan's fingerprint,
parameter shapes and kept-channel counts per group, each N:M mask's pattern and layout, the
weights a pass gave new values (SparseGPT's reconstruction in a streamed plan), and the int8 plan;
``<name>.safetensors`` beside it holds the kept indices (``keep/<plan>/<group>``, int64), the masks
(``mask/<weight>``, uint8) and the new values (``value/<weight>``).  When masks and values pass
:data:`~graphprune.tensor_store.PART_BYTES` they go to ``<name>-00001.safetensors``, ... instead
(listed in the JSON), written and read one part or tensor at a time, so a 7B model's plan never
sits in memory whole.  :func:`apply_plan_file` re-applies the structured plans (each refused,
naming what differs, on another architecture), the values and the masks to a fresh model.
Re-applying an int8 plan is not implemented yet: it is recorded for inspection, and applying a
file that has one says so instead of dropping it silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from graphprune.analysis import analyze
from graphprune.apply import apply_plan
from graphprune.capture import ExampleInputs, tensor_at
from graphprune.copying import clone
from graphprune.errors import InputError
from graphprune.plan import Plan
from graphprune.quantization import QuantPlan
from graphprune.sparsity import NMPattern, attach, satisfies, stored_at
from graphprune.tensor_store import PartWriter, TensorFiles

FORMAT, VERSION = "graphprune-plan", 2  # 2 added values and part files; version 1 files still load


@dataclass
class NMRecord:
    """One weight's N:M mask (the weight's name in the model the masks apply to)."""

    pattern: NMPattern
    mask: torch.Tensor  # bool, the weight's shape

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if tuple(self.mask.shape) != shape:
            raise InputError(f"the plan's mask for {name} is {list(self.mask.shape)}, the weight is {list(shape)}")


@dataclass
class PlanFile:
    """Everything a compression run decided, as data."""

    model: str
    pipeline: list[str] = field(default_factory=list)
    structured: list[Plan] = field(default_factory=list)  # in pass order
    masks: Mapping[str, NMRecord] = field(default_factory=dict)
    quantization: QuantPlan | None = None
    # weights a pass gave new values (after the structured plans' slicing, before masking)
    values: Mapping[str, torch.Tensor] = field(default_factory=dict)
    report: object = field(default=None, compare=False, repr=False)  # the run's Report, not saved
    inputs: dict | None = None  # dtypes and shapes of the example inputs (capture.input_spec)

    @classmethod
    def of(cls, model: str, pipeline: list[str], plans: list,
           masks: dict[str, tuple[torch.Tensor, NMPattern]]) -> "PlanFile":
        """The plan file of a run: its plans and its N:M masks (name -> (bool mask, pattern))."""
        masks = {name: NMRecord(pattern, mask.cpu()) for name, (mask, pattern) in masks.items()}
        quantization = [p for p in plans if isinstance(p, QuantPlan)]
        return cls(model, list(pipeline), [p for p in plans if isinstance(p, Plan)], masks,
                   quantization[-1] if quantization else None)

    def planned(self, name: str | None, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the dense model's ``name``) as this plan makes it: sliced by each structured
        plan in turn, given its new value if it has one, then masked; the same object if untouched."""
        out = tensor
        for structured in self.structured:
            for dim, kept in enumerate(structured.slices.get(name, []) if name is not None else []):
                if kept is not None:
                    out = out.index_select(dim, torch.tensor(kept, dtype=torch.long))
        if name is None:
            return out
        if name in self.values:
            value = self.values[name]
            if value.shape != out.shape:
                raise InputError(f"the plan's value for {name} is {list(value.shape)}, the weight is {list(out.shape)}")
            out = value.to(out.dtype)
        record = self.masks.get(name)
        if record is not None:
            record.check_shape(name, tuple(out.shape))
            out = out.masked_fill(~record.mask, 0)
        return out

    @classmethod
    def reapplicable(cls, plan: "PlanFile | str | os.PathLike") -> "PlanFile":
        """The plan (loaded if a path), refused if it holds what cannot be re-applied yet."""
        plan = plan if isinstance(plan, PlanFile) else cls.load(plan)
        if plan.quantization is not None:
            raise InputError("this plan holds an int8 plan, and re-applying int8 plans is not implemented yet; run "
                             "Quantize on the re-applied model (its plan is recorded here for inspection)")
        return plan

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> tuple[str, str]:
        """Write ``path`` (``.json``) and the tensors beside it (``.safetensors``, then numbered parts
        if they pass :data:`~graphprune.tensor_store.PART_BYTES`); returns the JSON and first file."""
        json_path, tensor_path = _paths(path)
        parts = PartWriter(tensor_path[:-len(".safetensors")])  # the first part is <name>.safetensors
        structured = []
        for k, plan in enumerate(self.structured):
            for gid, kept in plan.keep.items():
                parts.put(f"keep/{k}/{gid}", torch.tensor(kept, dtype=torch.int64))
            for name, dims in plan.slices.items():
                for d, kept in enumerate(dims):
                    if kept is not None:
                        parts.put(f"slice/{k}/{name}/{d}", torch.tensor(kept, dtype=torch.int64))
            structured.append({"fingerprint": plan.fingerprint, "result": plan.result,
                               "shapes": {n: "x".join(map(str, shape)) for n, shape in plan.shapes.items()},
                               "kept": {str(g): len(v) for g, v in sorted(plan.keep.items())},
                               "sliced": {n: [d for d, kept in enumerate(dims) if kept is not None]
                                          for n, dims in plan.slices.items()}})
        masks, values = {}, {}
        for name, record in self.masks.items():  # one at a time: a lazily read plan is never whole in memory
            parts.put(f"mask/{name}", record.mask.to(torch.uint8))
            masks[name] = {"pattern": str(record.pattern), "layout": record.pattern.layout,
                           "shape": list(record.mask.shape), "kept": int(record.mask.sum())}
        for name in self.values:
            value = self.values[name]
            parts.put(f"value/{name}", value)
            values[name] = list(value.shape)
        parts.flush(last=True)
        data = {"format": FORMAT, "version": VERSION, "model": self.model, "pipeline": self.pipeline,
                "structured": structured, "masks": masks, "values": values,
                "tensor_files": [os.path.basename(p) for p in parts.files[1:]], "example_inputs": self.inputs,
                "quantization": json.loads(self.quantization.to_json()) if self.quantization else None}
        with open(json_path, "w") as f:
            json.dump(data, f, indent=1)
        return json_path, tensor_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PlanFile":
        json_path, tensor_path = _paths(path)
        for p in (json_path, tensor_path):
            if not os.path.isfile(p):
                raise InputError(f"plan file {p}: no such file (a plan is a .json with a .safetensors beside it)")
        try:
            with open(json_path) as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise InputError(f"plan file {json_path} is not JSON: {exc}") from exc
        if data.get("format") != FORMAT or data.get("version") not in (1, VERSION):
            raise InputError(f"{json_path} is not a graphprune plan of version 1 or {VERSION} "
                             f"(format {data.get('format')!r}, version {data.get('version')!r})")
        folder = os.path.dirname(json_path)
        tensors = TensorFiles([tensor_path] + [os.path.join(folder, p) for p in data.get("tensor_files", [])])
        structured = []
        for k, entry in enumerate(data["structured"]):
            keep = {int(g): tensors[f"keep/{k}/{g}"].tolist() for g in entry["kept"]}
            shapes = {n: [int(d) for d in shape.split("x")] if shape else [] for n, shape in entry["shapes"].items()}
            slices = {}
            for name, dims in entry.get("sliced", {}).items():
                last = max(dims)
                slices[name] = [tensors[f"slice/{k}/{name}/{d}"].tolist() if d in dims else None for d in range(last + 1)]
            structured.append(Plan(keep, entry["fingerprint"], shapes, slices, entry.get("result")))
        patterns = {}
        for name, entry in data["masks"].items():
            n, m = (int(x) for x in entry["pattern"].split(":"))
            patterns[name] = NMPattern(n, m, entry["layout"])
        quantization = QuantPlan.from_json(json.dumps(data["quantization"])) if data["quantization"] else None
        return cls(data["model"], data["pipeline"], structured, StoredMasks(tensors, patterns), quantization,
                   StoredValues(tensors, list(data.get("values", {}))), inputs=data.get("example_inputs"))

    # ------------------------------------------------------------- reading
    def describe(self) -> str:
        lines = [f"plan for {self.model}: {' -> '.join(self.pipeline) or '(no pipeline recorded)'}"]
        for k, plan in enumerate(self.structured):
            lines.append(f"  structured plan {k} (fingerprint {plan.fingerprint}): {len(plan.keep)} groups pruned")
            for gid, kept in sorted(plan.keep.items()):
                lines.append(f"    group {gid}: keeps {len(kept)} channels")
        if self.masks:
            total = sum(r.mask.numel() for r in self.masks.values())
            kept = sum(int(r.mask.sum()) for r in self.masks.values())
            lines.append(f"  N:M masks on {len(self.masks)} weights ({kept / total:.1%} of their entries kept)")
        if self.values:
            lines.append(f"  new values for {len(self.values)} weights (SparseGPT's reconstruction)")
        if self.quantization:
            lines.append(f"  int8 plan for {len(self.quantization.layers)} layers")
        return "\n".join(lines)

    def diff(self, other: "PlanFile") -> list[str]:
        """What differs between two plans, one line each (empty: the same decisions)."""
        out = []
        if len(self.structured) != len(other.structured):
            out.append(f"structured plans: {len(self.structured)} vs {len(other.structured)}")
        for k, (a, b) in enumerate(zip(self.structured, other.structured)):
            if a.fingerprint != b.fingerprint:
                out.append(f"structured plan {k}: made for different architectures ({a.fingerprint} vs {b.fingerprint})")
            for gid in sorted(set(a.keep) | set(b.keep)):
                ka, kb = set(a.keep.get(gid, [])), set(b.keep.get(gid, []))
                if ka != kb:
                    out.append(f"structured plan {k}, group {gid}: keeps {len(ka) or 'all'} vs {len(kb) or 'all'} "
                               f"channels, {len(ka ^ kb)} differ")
        for name in sorted(set(self.masks) | set(other.masks)):
            a, b = self.masks.get(name), other.masks.get(name)
            if a is None or b is None:
                out.append(f"mask {name}: only in the {'second' if a is None else 'first'} plan")
            elif a.pattern != b.pattern or a.mask.shape != b.mask.shape:
                out.append(f"mask {name}: {a.pattern} {list(a.mask.shape)} vs {b.pattern} {list(b.mask.shape)}")
            elif not torch.equal(a.mask, b.mask):
                out.append(f"mask {name}: {int((a.mask != b.mask).sum())} of {a.mask.numel()} entries differ")
        for name in sorted(set(self.values) | set(other.values)):
            if name not in self.values or name not in other.values:
                out.append(f"value {name}: only in the {'second' if name not in self.values else 'first'} plan")
            elif not torch.equal(self.values[name], other.values[name]):
                out.append(f"value {name}: differs")
        qa = self.quantization.to_json() if self.quantization else None
        qb = other.quantization.to_json() if other.quantization else None
        if qa != qb:
            out.append("int8 plans differ")
        return out


class StoredMasks(Mapping[str, NMRecord]):
    """A loaded plan's masks, each read from its file when asked for."""

    def __init__(self, tensors: TensorFiles, patterns: dict[str, NMPattern]) -> None:
        self.tensors, self.patterns = tensors, patterns

    def __getitem__(self, name: str) -> NMRecord:
        return NMRecord(self.patterns[name], self.tensors[f"mask/{name}"].bool())

    def __iter__(self) -> Iterator[str]:
        return iter(self.patterns)

    def __len__(self) -> int:
        return len(self.patterns)


class StoredValues(Mapping[str, torch.Tensor]):
    """A loaded plan's new weight values, each read from its file when asked for."""

    def __init__(self, tensors: TensorFiles, names: list[str]) -> None:
        self.tensors, self.names = tensors, names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return self.tensors[f"value/{name}"]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _paths(path: str | os.PathLike) -> tuple[str, str]:
    path = os.fspath(path)
    stem = path[:-len(".json")] if path.endswith(".json") else path
    return stem + ".json", stem + ".safetensors"


def apply_plan_file(model: nn.Module, example_inputs: ExampleInputs, plan: PlanFile | str | os.PathLike,
                    *, inplace: bool = False) -> nn.Module:
    """Re-apply a saved plan to ``model`` (a copy unless ``inplace``): its structured plans in order,
    each checked against the model's analysis at that point, then its N:M masks."""
    plan = PlanFile.reapplicable(plan)
    working = model if inplace else clone(model)
    for structured in plan.structured:
        working = apply_plan(working, analyze(working, example_inputs), structured, inplace=True).module
    for name, value in plan.values.items():
        try:
            weight = tensor_at(working, name)
        except AttributeError:
            raise InputError(f"the plan has a new value for {name}, which this model does not have") from None
        if value.shape != weight.shape:
            raise InputError(f"the plan's value for {name} is {list(value.shape)}, the weight is {list(weight.shape)}")
        with torch.no_grad():
            stored_at(working, name).copy_(value)
    for name, record in plan.masks.items():
        try:
            weight = tensor_at(working, name)
        except AttributeError:
            raise InputError(f"the plan masks {name}, which this model does not have") from None
        record.check_shape(name, tuple(weight.shape))
        owner, _, attr = name.rpartition(".")
        attach(working.get_submodule(owner) if owner else working, attr, record.mask.to(weight.device),
               record.pattern)
        if not satisfies(tensor_at(working, name), record.pattern):
            raise InputError(f"the plan's mask for {name} does not hold its {record.pattern} pattern")
    return working
