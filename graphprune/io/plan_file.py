"""A run's plan on disk: what was decided, readable as JSON, with the tensors in safetensors.

``<name>.json`` (versioned, human-readable) holds the pipeline, the blocks removed (depth pruning:
every other entry names tensors as they are after the removal), each structured plan's fingerprint,
parameter shapes and kept-channel counts per group, each N:M mask's pattern and layout, the
weights a pass gave new values (SparseGPT's reconstruction in a streamed plan), the rank of each
low-rank compensation path (by layer), and the int8 plan; ``<name>.safetensors`` beside it holds the
kept indices (``keep/<plan>/<group>``, int64), the masks (``mask/<weight>``, uint8), the new values
(``value/<weight>``) and the paths' factors (``low_rank/<layer>/down`` and ``/up``).  Names are
those of the model without paths (a compensated layer's weight is ``<layer>.weight``, not
``<layer>.base.weight``).  When masks and values pass
:data:`~graphprune.io.tensor_store.PART_BYTES` they go to ``<name>-00001.safetensors``, ... instead
(listed in the JSON), written and read one part or tensor at a time, so a 7B model's plan never
sits in memory whole.  :func:`apply_plan_file` re-applies the block removal, the structured plans
(each refused, naming what differs, on another architecture), the values and the masks to a fresh model.
Re-applying an int8 plan is not implemented yet: it is recorded for inspection, and applying a
file that has one says so instead of dropping it silently.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from graphprune.algorithms.nm import CONV, CONV1D, LINEAR, NMPattern, satisfies
from graphprune.algorithms.quant import QuantPlan
from graphprune.core.depth import BlockRemoval
from graphprune.core.plan import Plan
from graphprune.errors import InputError
from graphprune.frontends.torch.analysis import analyze
from graphprune.frontends.torch.apply import apply_plan
from graphprune.frontends.torch.capture import ExampleInputs, normalize_inputs, tensor_at
from graphprune.frontends.torch.copying import clone
from graphprune.frontends.torch.depth import remove_checked
from graphprune.frontends.torch.fake_quant import quantize_by_plan
from graphprune.frontends.torch.folding import fold_batchnorm
from graphprune.frontends.torch.lowrank import compensate, refusal
from graphprune.frontends.torch.masks import attach, stored_at
from graphprune.io.outputs import Outputs, resolved, writing
from graphprune.io.tensor_store import PartWriter, TensorFiles, file_format

FORMAT, VERSION = "graphprune-plan", 4  # 2 added values and part files, 3 low-rank paths, 4 removed blocks
PART_METADATA = {"format": FORMAT}  # in each tensor file's header: marks it as a plan's, safe to replace


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
    # low-rank compensation paths beside layers: layer name -> (down [rank, in], up [out, rank], the
    # layer's weight layout)
    low_rank: Mapping[str, tuple[torch.Tensor, torch.Tensor, str]] = field(default_factory=dict)
    report: object = field(default=None, compare=False, repr=False)  # the run's Report, not saved
    inputs: dict | None = None  # dtypes and shapes of the example inputs (capture.input_spec)
    files: list[str] = field(default_factory=list, compare=False, repr=False)  # read from (a loaded plan)
    depth: BlockRemoval | None = None  # blocks removed before everything else

    def renamed(self, name: str) -> str | None:
        """``name`` in the model as given, as this plan names it (None: in a removed block)."""
        return name if self.depth is None else self.depth.renamed(name)

    @classmethod
    def of(
        cls, model: str, pipeline: list[str], plans: list, masks: dict[str, tuple[torch.Tensor, NMPattern]]
    ) -> "PlanFile":
        """The plan file of a run: its plans and its N:M masks (name -> (bool mask, pattern))."""
        masks = {name: NMRecord(pattern, mask.cpu()) for name, (mask, pattern) in masks.items()}
        quantization = [p for p in plans if isinstance(p, QuantPlan)]
        depth = [p for p in plans if isinstance(p, BlockRemoval)]
        if len(depth) > 1:
            raise InputError("a plan file records one block removal; this run made several")
        return cls(
            model,
            list(pipeline),
            [p for p in plans if isinstance(p, Plan)],
            masks,
            quantization[-1] if quantization else None,
            depth=depth[0] if depth else None,
        )

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
    def reapplicable(cls, plan: "PlanFile | str | os.PathLike", *, quantization: bool = False) -> "PlanFile":
        """The plan (loaded if a path), refused if it quantizes and the caller cannot re-apply that
        (``quantization=False``)."""
        plan = plan if isinstance(plan, PlanFile) else cls.load(plan)
        if plan.quantization is not None and not quantization:
            raise InputError(
                f"this plan holds a {plan.quantization.kind} quantization plan, which is re-applied to PyTorch "
                "models only (gp.apply_plan_file), not here yet; re-apply the rest of a plan saved before "
                "Quantize, then quantize"
            )
        return plan

    # ------------------------------------------------------------------ files
    def save(
        self, path: str | os.PathLike, *, overwrite: bool = False, outputs: Outputs | None = None
    ) -> tuple[str, str]:
        """Write ``path`` (``.json``) and the tensors beside it (``.safetensors``, then numbered parts
        if they pass :data:`~graphprune.io.tensor_store.PART_BYTES`); returns the JSON and first file.

        Every file is claimed in ``outputs`` (or a transaction of its own) and lands only when all
        were written: an existing file is replaced only when graphprune wrote it as a plan file, or
        with ``overwrite``, so ``model.json`` never silently replaces a user's ``model.safetensors``."""
        json_path, tensor_path = _paths(path)
        with writing(outputs, overwrite=overwrite) as out:
            staged_json = out.claim(json_path, ours=_is_plan_json)
            # the first part is <name>.safetensors; each part is claimed as it is started
            parts = PartWriter(
                tensor_path[: -len(".safetensors")],
                metadata=PART_METADATA,
                claim=lambda part: out.claim(part, ours=_is_plan_part),
            )
            data = self._write_tensors(parts)
            with open(staged_json, "w") as f:
                json.dump(data, f, indent=1)
        return json_path, tensor_path

    def _write_tensors(self, parts: PartWriter) -> dict:
        """Put every tensor into ``parts``; the JSON that describes them."""
        structured = []
        for k, plan in enumerate(self.structured):
            for gid, kept in plan.keep.items():
                parts.put(f"keep/{k}/{gid}", torch.tensor(kept, dtype=torch.int64))
            for name, dims in plan.slices.items():
                for d, kept in enumerate(dims):
                    if kept is not None:
                        parts.put(f"slice/{k}/{name}/{d}", torch.tensor(kept, dtype=torch.int64))
            structured.append(
                {
                    "fingerprint": plan.fingerprint,
                    "result": plan.result,
                    "shapes": {n: "x".join(map(str, shape)) for n, shape in plan.shapes.items()},
                    "kept": {str(g): len(v) for g, v in sorted(plan.keep.items())},
                    "sliced": {
                        n: [d for d, kept in enumerate(dims) if kept is not None] for n, dims in plan.slices.items()
                    },
                }
            )
        masks, values = {}, {}
        for name, record in self.masks.items():  # one at a time: a lazily read plan is never whole in memory
            parts.put(f"mask/{name}", record.mask.to(torch.uint8))
            masks[name] = {
                "pattern": str(record.pattern),
                "layout": record.pattern.layout,
                "shape": list(record.mask.shape),
                "kept": int(record.mask.sum()),
            }
        for name in self.values:
            value = self.values[name]
            parts.put(f"value/{name}", value)
            values[name] = list(value.shape)
        low_rank = {}
        for layer, (down, up, layout) in self.low_rank.items():
            parts.put(f"low_rank/{layer}/down", down)
            parts.put(f"low_rank/{layer}/up", up)
            low_rank[layer] = {"rank": down.shape[0], "in": down.shape[1], "out": up.shape[0], "layout": layout}
        parts.flush(last=True)
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "pipeline": self.pipeline,
            "structured": structured,
            "masks": masks,
            "values": values,
            "low_rank": low_rank,
            "depth": (
                None
                if self.depth is None
                else {"blocks": self.depth.blocks, "count": self.depth.count, "removed": list(self.depth.removed)}
            ),
            "tensor_files": [os.path.basename(p) for p in parts.files[1:]],
            "example_inputs": self.inputs,
            "quantization": json.loads(self.quantization.to_json()) if self.quantization else None,
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PlanFile":
        """Read a plan file, checked against its schema (see :func:`_parse`): a damaged or edited
        file is refused naming the entry, before anything is applied or written."""
        json_path, tensor_path = _paths(path)
        for p in (json_path, tensor_path):
            if not os.path.isfile(p):
                raise InputError(f"plan file {p}: no such file (a plan is a .json with a .safetensors beside it)")
        try:
            with open(json_path) as f:
                data = json.load(f)
        except ValueError as exc:  # not JSON, or not text
            raise InputError(f"plan file {json_path} is not JSON: {exc}") from exc
        return _parse(json_path, tensor_path, data)

    # ------------------------------------------------------------- reading
    def stored_shapes(self) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """The shapes of the new values and of the masks, from the files' headers for a loaded plan
        (nothing is read): what a writer checks before it starts."""
        values = {
            n: self.values.shape(n) if isinstance(self.values, StoredValues) else list(self.values[n].shape)
            for n in self.values
        }
        masks = {
            n: self.masks.shape(n) if isinstance(self.masks, StoredMasks) else list(self.masks[n].mask.shape)
            for n in self.masks
        }
        return values, masks

    def describe(self) -> str:
        lines = [f"plan for {self.model}: {' -> '.join(self.pipeline) or '(no pipeline recorded)'}"]
        if self.depth is not None:
            lines.append(
                f"  blocks removed from {self.depth.blocks}: {', '.join(map(str, self.depth.removed))} "
                f"({len(self.depth.kept)} of {self.depth.count} kept)"
            )
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
        if self.low_rank:
            ranks = sorted(down.shape[0] for down, _, _ in self.low_rank.values())
            shown = str(ranks[0]) if ranks[0] == ranks[-1] else f"{ranks[0]}-{ranks[-1]}"
            added = sum(down.numel() + up.numel() for down, up, _ in self.low_rank.values())
            lines.append(f"  low-rank paths beside {len(self.low_rank)} layers (ranks {shown}, {added} parameters)")
        if self.quantization:
            lines.append(f"  {self.quantization.kind} plan for {len(self.quantization.layers)} layers")
        return "\n".join(lines)

    def diff(self, other: "PlanFile") -> list[str]:
        """What differs between two plans, one line each (empty: the same decisions)."""
        out = []
        if self.depth != other.depth:
            out.append(f"blocks removed: {self.depth} vs {other.depth}")
        if len(self.structured) != len(other.structured):
            out.append(f"structured plans: {len(self.structured)} vs {len(other.structured)}")
        for k, (a, b) in enumerate(zip(self.structured, other.structured)):
            if a.fingerprint != b.fingerprint:
                out.append(
                    f"structured plan {k}: made for different architectures ({a.fingerprint} vs {b.fingerprint})"
                )
            for gid in sorted(set(a.keep) | set(b.keep)):
                ka, kb = set(a.keep.get(gid, [])), set(b.keep.get(gid, []))
                if ka != kb:
                    out.append(
                        f"structured plan {k}, group {gid}: keeps {len(ka) or 'all'} vs {len(kb) or 'all'} "
                        f"channels, {len(ka ^ kb)} differ"
                    )
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
        for layer in sorted(set(self.low_rank) | set(other.low_rank)):
            if layer not in self.low_rank or layer not in other.low_rank:
                out.append(
                    f"low-rank path {layer}: only in the {'second' if layer not in self.low_rank else 'first'} plan"
                )
            elif self.low_rank[layer][2] != other.low_rank[layer][2] or not all(
                torch.equal(a, b) for a, b in zip(self.low_rank[layer][:2], other.low_rank[layer][:2])
            ):
                out.append(f"low-rank path {layer}: differs")
        qa = self.quantization.to_json() if self.quantization else None
        qb = other.quantization.to_json() if other.quantization else None
        if qa != qb:
            out.append("int8 plans differ")
        return out


class StoredMasks(Mapping[str, NMRecord]):
    """A loaded plan's masks, each read from its file when asked for.  With ``kept`` (a plan file's
    counts: its headers were checked at load, its values are read only now) each is checked then."""

    def __init__(
        self, tensors: TensorFiles, patterns: dict[str, NMPattern], kept: dict[str, int] | None = None
    ) -> None:
        self.tensors, self.patterns, self.kept = tensors, patterns, kept

    def __getitem__(self, name: str) -> NMRecord:
        stored = self.tensors[f"mask/{name}"]
        if self.kept is not None and (bool((stored > 1).any()) or int(stored.sum()) != self.kept[name]):
            raise InputError(
                f"the plan's mask for {name} (in {self.tensors.where(f'mask/{name}')}) does not match "
                f"its JSON entry (which keeps {self.kept[name]} entries): the file is damaged; save "
                "the plan again"
            )
        return NMRecord(self.patterns[name], stored.bool())

    def shape(self, name: str) -> list[int]:
        """The mask's shape from its file's header (its values are not read)."""
        return self.tensors.shape(f"mask/{name}")

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

    def shape(self, name: str) -> list[int]:
        """The value's shape from its file's header (its values are not read)."""
        return self.tensors.shape(f"value/{name}")

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _paths(path: str | os.PathLike) -> tuple[str, str]:
    path = os.fspath(path)
    stem = path[: -len(".json")] if path.endswith(".json") else path
    return stem + ".json", stem + ".safetensors"


def _is_plan_json(path: str) -> bool:
    """Whether ``path`` is a plan's JSON (graphprune may replace it without ``overwrite``)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def _is_plan_part(path: str) -> bool:
    """Whether ``path`` is a plan's tensor file: its header carries :data:`PART_METADATA`."""
    return file_format(path) == FORMAT


# ------------------------------------------------------------------ the file's schema
# Everything :meth:`PlanFile.load` reads is checked here, in one place, so that a damaged, truncated
# or edited plan file is refused with the file, the entry and what is wrong, rather than failing
# with a raw exception halfway through applying it (or, worse, being applied).  Indices are checked
# against the shapes the file records; :func:`graphprune.io.checkpoint.apply_to_checkpoint` checks
# them again against the checkpoint's own shapes before it writes.

INDEX_DTYPE, MASK_DTYPE, VALUE_DTYPES = "I64", "U8", ("F64", "F32", "F16", "BF16")
LAYOUTS = (LINEAR, CONV1D, CONV)
_PATTERN = re.compile(r"([0-9]+):([0-9]+)")
_SHAPE = re.compile(r"(?:[0-9]+(?:x[0-9]+)*)?")


def check_kept(kept: list[int], size: int | None, where: str) -> None:
    """Refuse kept indices that are not strictly increasing (so unique) within ``[0, size)``: a
    damaged list (all zeros, out of range) would otherwise gather the wrong channels silently."""
    if not kept:
        raise InputError(f"{where}: keeps no index (a pruned dim keeps at least one)")
    if any(b <= a for a, b in zip(kept, kept[1:])):
        raise InputError(f"{where}: indices are not strictly increasing (repeated or unsorted): the plan is damaged")
    if kept[0] < 0:
        raise InputError(f"{where}: index {kept[0]} is negative: the plan is damaged")
    if size is not None and kept[-1] >= size:
        raise InputError(
            f"{where}: index {kept[-1]} is outside the dim's {size} entries: the plan is damaged or "
            "was made for another model"
        )


class _Reader:
    """The checks of one plan file; each failure names the file and the entry."""

    def __init__(self, json_path: str, tensors: TensorFiles | None = None) -> None:
        self.json_path, self.tensors = json_path, tensors

    def fail(self, entry: str, what: str) -> InputError:
        return InputError(
            f"plan file {self.json_path}: {entry} {what}; the file is damaged or was not written by "
            "graphprune (save the plan again)"
        )

    def typed(self, value: object, kind: type | tuple[type, ...], entry: str) -> Any:
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            names = " or ".join(
                k.__name__ if k is not type(None) else "null" for k in (kind if isinstance(kind, tuple) else (kind,))
            )
            raise self.fail(entry, f"is {type(value).__name__} {_short(value)}, not {names}")
        return value

    def key(self, data: dict, key: str, kind: type | tuple[type, ...], entry: str, default: object = ...) -> Any:
        if key not in data:
            if default is ...:
                raise self.fail(entry, f"has no {key!r}")
            return default
        return self.typed(data[key], kind, f"{entry}[{key!r}]")

    def count(self, value: object, entry: str) -> int:
        if self.typed(value, int, entry) < 0:
            raise self.fail(entry, f"is {value}, a negative count")
        return value

    def tensor(self, name: str, dtypes: tuple[str, ...], shape: list[int] | None = None) -> list[int]:
        """The stored shape of ``name``, refused when missing, of another dtype or shape."""
        if name not in self.tensors:
            raise self.fail(f"tensor {name!r}", "is not in its tensor files")
        if self.tensors.dtype(name) not in dtypes:
            raise self.fail(f"tensor {name!r}", f"is {self.tensors.dtype(name)}, not {' or '.join(dtypes)}")
        stored = self.tensors.shape(name)
        if shape is not None and stored != shape:
            raise self.fail(f"tensor {name!r}", f"has shape {stored}, its JSON entry says {shape}")
        return stored

    def indices(self, name: str, length: int | None, size: int | None) -> list[int]:
        """The 1-D index tensor ``name`` (of ``length`` entries if given), checked by :func:`check_kept`."""
        stored = self.tensor(name, (INDEX_DTYPE,))
        if len(stored) != 1 or (length is not None and stored[0] != length):
            raise self.fail(f"tensor {name!r}", f"has shape {stored}, not [{length if length is not None else 'n'}]")
        kept = self.tensors[name].tolist()
        check_kept(kept, size, f"plan file {self.json_path}: tensor {name!r}")
        return kept

    def confined(self, entry: object) -> str:
        """The path of a ``tensor_files`` entry: a plain ``.safetensors`` name in the plan's folder."""
        where = f"'tensor_files' entry {_short(entry)}"
        name = self.typed(entry, str, where)
        folder = os.path.dirname(self.json_path)
        if (
            os.path.basename(name) != name
            or "/" in name
            or "\\" in name
            or os.path.isabs(name)
            or name in (".", "..")
            or not name.endswith(".safetensors")
        ):
            raise self.fail(where, "is not a plain .safetensors file name (a plan's parts lie beside its JSON)")
        path = os.path.join(folder, name)
        if os.path.dirname(resolved(path)) != resolved(folder):
            raise self.fail(where, f"resolves to {resolved(path)}, outside the plan's folder")
        return path


def _short(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, list, dict, type(None))) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _parse(json_path: str, tensor_path: str, data: object) -> PlanFile:
    """The plan in ``data`` (the JSON) and its tensor files, every entry checked: types, index lists
    (strictly increasing, within the recorded dims, as many as the JSON's ``kept``), N:M patterns,
    and each stored tensor's dtype and shape against its JSON entry."""
    read = _Reader(json_path)
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") not in (1, 2, 3, VERSION):
        found = (
            f"format {data.get('format')!r}, version {data.get('version')!r}"
            if isinstance(data, dict)
            else f"a JSON {type(data).__name__}"
        )
        raise InputError(f"{json_path} is not a graphprune plan of version 1 to {VERSION} ({found})")
    model = read.key(data, "model", str, "the plan")
    pipeline = [
        read.typed(p, str, f"'pipeline' entry {i}") for i, p in enumerate(read.key(data, "pipeline", list, "the plan"))
    ]
    parts = read.key(data, "tensor_files", list, "the plan", [])
    read.tensors = TensorFiles([tensor_path] + [read.confined(p) for p in parts])
    structured = [
        _structured(read, k, read.typed(entry, dict, f"'structured' entry {k}"))
        for k, entry in enumerate(read.key(data, "structured", list, "the plan"))
    ]
    patterns, kept = {}, {}
    for name, entry in read.key(data, "masks", dict, "the plan").items():
        patterns[name], kept[name] = _mask(read, name, read.typed(entry, dict, f"'masks' entry {name!r}"))
    values = read.key(data, "values", dict, "the plan", {})
    for name, shape in values.items():
        where = f"'values' entry {name!r}"
        read.tensor(f"value/{name}", VALUE_DTYPES, [read.count(d, where) for d in read.typed(shape, list, where)])
    low_rank = {}
    for layer, entry in read.key(data, "low_rank", dict, "the plan", {}).items():
        where = f"'low_rank' entry {layer!r}"
        entry = read.typed(entry, dict, where)
        rank, features, out = (
            read.count(read.key(entry, k, int, where), f"{where} {k}") for k in ("rank", "in", "out")
        )
        layout = read.key(entry, "layout", str, where)
        if layout not in (LINEAR, CONV1D):
            raise read.fail(f"{where} layout", f"is {layout!r}, not {LINEAR} or {CONV1D}")
        read.tensor(f"low_rank/{layer}/down", VALUE_DTYPES, [rank, features])
        read.tensor(f"low_rank/{layer}/up", VALUE_DTYPES, [out, rank])
        low_rank[layer] = (read.tensors[f"low_rank/{layer}/down"], read.tensors[f"low_rank/{layer}/up"], layout)
    depth = _depth(read, read.key(data, "depth", (dict, type(None)), "the plan", None))
    quantization = read.key(data, "quantization", (dict, type(None)), "the plan", None)
    if quantization is not None:
        try:
            quantization = QuantPlan.from_json(json.dumps(quantization))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise read.fail("'quantization'", f"is not a quantization plan ({type(exc).__name__}: {exc})") from exc
    inputs = _example_inputs(read, read.key(data, "example_inputs", (dict, type(None)), "the plan", None))
    return PlanFile(
        model=model,
        pipeline=pipeline,
        structured=structured,
        masks=StoredMasks(read.tensors, patterns, kept),
        quantization=quantization,
        values=StoredValues(read.tensors, list(values)),
        low_rank=low_rank,
        inputs=inputs,
        files=[json_path, *read.tensors.files],
        depth=depth,
    )


def _depth(read: _Reader, entry: dict | None) -> BlockRemoval | None:
    """The recorded block removal: the list's path, its block count and the positions removed."""
    if entry is None:
        return None
    blocks = read.key(entry, "blocks", str, "'depth'")
    count = read.count(read.key(entry, "count", int, "'depth'"), "'depth' count")
    removed = [read.count(i, "'depth' removed") for i in read.key(entry, "removed", list, "'depth'")]
    try:
        return BlockRemoval(blocks, count, tuple(removed))
    except InputError as exc:
        raise read.fail("'depth'", f"is not a block removal ({exc})") from exc


def _structured(read: _Reader, k: int, entry: dict) -> Plan:
    """Structured plan ``k``: its kept channels per group and kept indices per tensor dim."""
    where = f"'structured' entry {k}"
    fingerprint = read.key(entry, "fingerprint", (str, type(None)), where)
    result = read.key(entry, "result", (str, type(None)), where, None)
    shapes = {}
    for name, shape in read.key(entry, "shapes", dict, where).items():
        if not _SHAPE.fullmatch(read.typed(shape, str, f"{where} shape of {name!r}")):
            raise read.fail(f"{where} shape of {name!r}", f"is {shape!r}, not sizes joined by 'x' (e.g. '64x32')")
        shapes[name] = [int(d) for d in shape.split("x")] if shape else []
    keep = {}
    for group, count in read.key(entry, "kept", dict, where).items():
        if not group.isdigit():
            raise read.fail(f"{where} 'kept'", f"names group {group!r}, not a group number")
        keep[int(group)] = read.indices(f"keep/{k}/{group}", read.count(count, f"{where} kept of group {group}"), None)
    slices = {}
    for name, dims in read.key(entry, "sliced", dict, where, {}).items():
        dims = [read.count(d, f"{where} sliced dims of {name!r}") for d in read.typed(dims, list, f"{where} {name!r}")]
        shape = shapes.get(name)  # None: a buffer, whose shape the file does not record
        if not dims or any(b <= a for a, b in zip(dims, dims[1:])) or (shape is not None and dims[-1] >= len(shape)):
            raise read.fail(f"{where} sliced dims of {name!r}", f"are {dims}: not increasing dims of its shape {shape}")
        slices[name] = [
            read.indices(f"slice/{k}/{name}/{d}", None, shape[d] if shape is not None else None) if d in dims else None
            for d in range(dims[-1] + 1)
        ]
    return Plan(keep=keep, fingerprint=fingerprint, shapes=shapes, slices=slices, result=result)


def _example_inputs(read: _Reader, spec: dict | None) -> dict | None:
    """The recorded example inputs (:func:`graphprune.frontends.torch.capture.input_spec`): each a ``[dtype, shape]``
    or a ``{"value": ...}``, as :func:`graphprune.frontends.torch.capture.spec_inputs` rebuilds them."""
    if spec is None:
        return None
    entries = [
        (f"'example_inputs' args entry {i}", e) for i, e in enumerate(read.key(spec, "args", list, "'example_inputs'"))
    ]
    entries += [
        (f"'example_inputs' kwargs entry {k!r}", e)
        for k, e in read.key(spec, "kwargs", dict, "'example_inputs'").items()
    ]
    for where, entry in entries:
        if isinstance(entry, dict) and set(entry) == {"value"}:
            continue
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and isinstance(getattr(torch, entry[0], None), torch.dtype)
            and isinstance(entry[1], list)
        ):
            raise read.fail(where, f'is {_short(entry)}, not [dtype, shape] or {{"value": ...}}')
        for d in entry[1]:
            read.count(d, f"{where} shape")
    return spec


def _mask(read: _Reader, name: str, entry: dict) -> tuple[NMPattern, int]:
    """Mask ``name``'s pattern and kept count, its stored tensor checked against its recorded shape."""
    where = f"'masks' entry {name!r}"
    pattern = read.key(entry, "pattern", str, where)
    layout = read.key(entry, "layout", str, where)
    match = _PATTERN.fullmatch(pattern)
    if match is None or not 0 < int(match[1]) < int(match[2]):
        raise read.fail(f"{where} pattern", f"is {pattern!r}, not N:M with 0 < N < M")
    if layout not in LAYOUTS:
        raise read.fail(f"{where} layout", f"is {layout!r}, not one of {', '.join(LAYOUTS)}")
    shape = [read.count(d, f"{where} shape") for d in read.key(entry, "shape", list, where)]
    kept = read.count(read.key(entry, "kept", int, where), f"{where} kept")
    if kept > math.prod(shape):
        raise read.fail(f"{where} kept", f"is {kept}, more than the {math.prod(shape)} entries of shape {shape}")
    read.tensor(f"mask/{name}", (MASK_DTYPE,), shape)
    return NMPattern(int(match[1]), int(match[2]), layout), kept


def apply_plan_file(
    model: nn.Module, example_inputs: ExampleInputs, plan: PlanFile | str | os.PathLike, *, inplace: bool = False
) -> nn.Module:
    """Re-apply a saved plan to ``model`` (a copy unless ``inplace``): its block removal (checked against
    the model with those blocks bypassed), its structured plans in order, each checked against the
    model's analysis at that point, then its N:M masks, then its low-rank paths, then its quantization."""
    plan = PlanFile.reapplicable(plan, quantization=True)
    working = model if inplace else clone(model)
    if plan.depth is not None:
        try:
            working.get_submodule(plan.depth.blocks)
        except AttributeError:
            raise InputError(
                f"the plan removes blocks of {plan.depth.blocks}, which this model does not have"
            ) from None
        remove_checked(working, plan.depth, *normalize_inputs(example_inputs))
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
        attach(working.get_submodule(owner) if owner else working, attr, record.mask.to(weight.device), record.pattern)
        if not satisfies(tensor_at(working, name), record.pattern):
            raise InputError(f"the plan's mask for {name} does not hold its {record.pattern} pattern")
    for layer, (down, up, layout) in plan.low_rank.items():
        try:
            weight = tensor_at(working, f"{layer}.weight")
        except AttributeError:
            raise InputError(f"the plan puts a low-rank path beside {layer}, which this model does not have") from None
        shape = (up.shape[0], down.shape[1]) if layout == LINEAR else (down.shape[1], up.shape[0])
        if tuple(weight.shape) != shape:
            raise InputError(
                f"the plan's low-rank path beside {layer} fits a {list(shape)} weight, the weight is "
                f"{list(weight.shape)}"
            )
        if (why := refusal(working, layer, weight, layout)) is not None:
            raise InputError(f"the plan puts a low-rank path beside {layer}, which cannot take one: {why}")
        compensate(working, layer, down, up, layout)
    if plan.quantization is not None:
        _quantize(working, plan.quantization)
    return working


def _quantize(model: nn.Module, plan: QuantPlan) -> None:
    """The plan's BatchNorm folds, then its fake quantization, everything checked against the model
    before anything changes (folding keeps shapes)."""
    for conv, batchnorm in plan.folded.items():
        try:
            model.get_submodule(conv), model.get_submodule(batchnorm)
        except AttributeError:
            raise InputError(f"the plan folds {batchnorm} into {conv}, which this model does not have") from None
    for name, layer in plan.layers.items():
        try:
            weight = tensor_at(model, name)
        except AttributeError:
            raise InputError(f"the plan quantizes {name}, which this model does not have") from None
        channels, scales = weight.shape[layer.axis], layer.scale().shape
        groups = weight.numel() // channels // layer.group_size if layer.group_size else None
        if scales != ((channels, groups) if groups else (channels,)):
            raise InputError(
                f"the plan's {plan.kind} scales for {name} are {list(scales)}, not those of a "
                f"{list(weight.shape)} weight"
            )
    for conv, batchnorm in plan.folded.items():
        fold_batchnorm(model, conv, batchnorm)
    quantize_by_plan(model, plan)
