"""Apply a plan file to a safetensors checkpoint, shard by shard, without building the model.

A plan file records, for every tensor a structured plan shrinks, the kept indices of each dim
(:attr:`graphprune.core.plan.Plan.slices`), every N:M mask and every new weight value (SparseGPT's
update in a streamed plan); that is all a checkpoint needs (:meth:`PlanFile.planned`).
:func:`apply_to_checkpoint` reads one shard at a time (peak memory: about one shard), slices and
masks its tensors, and writes the pruned shard; the index is rewritten with the new total size and
the other files are copied.  A plan that removes blocks (depth pruning) drops their tensors, renumbers
the later blocks' tensors (in the shards and the index), and sets ``config.json``'s layer count and
per-layer lists (``layer_types``) to the kept blocks.  Width changes need new sizes in ``config.json``,
and the plan knows dims, not what they mean (4096 may be the hidden size in one tensor and heads x
head_dim in another).  The caller may name them (``config={"intermediate_size": 5504}``).  Otherwise, where transformers
knows the architecture, :func:`infer_config` searches for the change of fewest sizes under which
the architecture built on ``meta`` has exactly the planned shapes and analyses like the model the
plan made.  Without a certain answer the call is refused before any work, listing how the plan
changes dims.

Nothing is written until the plan, the source and the destination were checked: a destination
(or its staging folder ``<destination>.partial``) that is, holds or lies inside the source or the
plan's files is refused, an existing destination is replaced only with ``overwrite``, and every
index of the plan is checked against the shards' own shapes (as are its values and masks).
Writes go to ``<destination>.partial`` (each shard written whole, then renamed), so an
interrupted run (killed, out of disk) leaves that folder and resumes where it stopped when called
again with the same plan, options and source.  The source is identified by content, not path:
each shard's name, size, mtime and header digest are recorded in the folder, and a run that finds
them changed (or another plan, prefix or config) is refused, naming what changed, rather than
resuming into stale shards or deleting the folder unasked: remove it to start again.  The
directory becomes ``<destination>`` only after verification (a failed one removes the folder):
every tensor the plan names was found, shapes are the planned ones, N:M patterns hold on the
written values, and, where ``transformers`` knows the architecture in ``config.json``, the model
built from the new config on the ``meta`` device has exactly the written shapes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from graphprune.algorithms.nm import satisfies
from graphprune.errors import GraphpruneError, InputError
from graphprune.frontends.torch.analysis import analyze
from graphprune.frontends.torch.capture import spec_inputs
from graphprune.frontends.torch.depth import per_layer_lists
from graphprune.io import compressed_tensors
from graphprune.io.outputs import Outputs, overlap
from graphprune.io.plan_file import PlanFile, check_kept
from graphprune.io.tensor_store import opened


@dataclass
class CheckpointReport:
    """What :func:`apply_to_checkpoint` wrote."""

    destination: str
    shards: int
    tensors_changed: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    resumed_shards: int = 0
    config: dict[str, object] = field(default_factory=dict)  # the config.json keys changed
    notes: list[str] = field(default_factory=list)  # what the written format does not say

    def __str__(self) -> str:
        shown = {
            k: (f"<{v.get('format')}>" if k == "quantization_config" and isinstance(v, dict) else v)
            for k, v in self.config.items()
        }
        return (
            f"{self.destination}: {self.shards} shards, {len(self.tensors_changed)} tensors changed, "
            f"{self.bytes_before / 1e6:.1f} MB -> {self.bytes_after / 1e6:.1f} MB"
            + (f", resumed after {self.resumed_shards} finished shards" if self.resumed_shards else "")
            + (f", config.json: {shown}" if self.config else "")
            + "".join(f"\n  note: {note}" for note in self.notes)
        )


def apply_to_checkpoint(
    plan: PlanFile | str | os.PathLike,
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    prefix: str = "",
    config: dict[str, object] | None = None,
    overwrite: bool = False,
    format: str | None = None,
) -> CheckpointReport:
    """Write the checkpoint in ``source`` (a folder of ``.safetensors`` shards, with their index and
    any other files) pruned by ``plan`` to the folder ``destination``.

    ``prefix`` is prepended to the plan's tensor names to find them in the checkpoint (a plan made
    on ``LlamaModel`` applies to a ``LlamaForCausalLM`` checkpoint with ``prefix="model."``).
    ``config`` updates ``config.json`` (see the module doc; ``{}`` copies it unchanged on purpose).
    An existing ``destination`` (not empty) is replaced only with ``overwrite``; one that is, holds or
    lies inside the source or the plan's files is refused, and so is such a staging folder.

    ``format="compressed-tensors"`` writes the plan's quantization (int4 or fp8) in the layout vLLM
    and transformers load (:mod:`graphprune.io.compressed_tensors`); a plan that quantizes needs it.
    """
    plan_file = PlanFile.reapplicable(plan, quantization=True)
    _check_format(plan_file, format)
    if plan_file.low_rank:
        raise InputError(
            f"this plan puts low-rank paths beside {len(plan_file.low_rank)} layers, which a Hugging Face "
            "checkpoint cannot carry (from_pretrained would drop the extra tensors without a word): apply "
            "the plan to the model with gp.apply_plan_file, or export it with export_onnx"
        )
    source, destination = Path(source), Path(destination)
    partial = Path(os.path.abspath(destination) + ".partial")
    inputs = [source, *plan_file.files]
    with Outputs(inputs=inputs, overwrite=overwrite) as outputs:
        outputs.check(destination, folder=True)
        given = overlap(partial, inputs)
        if given is not None:
            raise InputError(
                f"cannot stage the checkpoint in {partial} (beside {destination}): it overlaps an input "
                f"({given}); name another destination"
            )
        shards, config = _prepared(plan_file, source, prefix, config)
        identity = json.loads(
            json.dumps(
                {
                    "plan": _digest(plan_file),
                    "source": _source_identity(shards),
                    "prefix": prefix,
                    "config": config,
                    "format": format,
                },
                default=str,
            )
        )
        _check_resumable(partial, identity)
        report = CheckpointReport(str(destination), len(shards))
        if plan_file.quantization is not None and plan_file.masks:
            report.notes.append(
                f"{len(plan_file.masks)} N:M-masked weights keep their zeros in the quantized values, but "
                "compressed-tensors (0.15 on) writes no sparsity metadata: loaders will not know they are N:M"
            )
        report = _write(partial, report, shards, plan_file, prefix, config or {}, identity)
        staged = outputs.claim(destination, folder=True)
        os.rmdir(staged)
        os.replace(partial, staged)
    return report


def _prepared(
    plan: PlanFile, source: Path, prefix: str, config: dict[str, object] | None
) -> tuple[list[Path], dict[str, object] | None]:
    """The source's shards and the config change, everything checked before anything is written."""
    shards = sorted(source.glob("*.safetensors"))
    if not shards:
        raise InputError(f"{source}: no .safetensors files (apply_to_checkpoint reads safetensors checkpoints only)")
    unsliced = [k for k, p in enumerate(plan.structured) if p.keep and not p.slices]
    if unsliced:
        raise InputError(
            "this plan file records no per-tensor slices (it was written by an older graphprune): "
            "re-run the pruning and save the plan again"
        )
    _check_other_files(source)
    dense, planned = _check_source(shards, plan, prefix)
    if plan.quantization is not None:
        present = {_plan_name(new, prefix) for name in dense if (new := _new_name(name, plan, prefix)) is not None}
        missing = sorted(set(plan.quantization.layers) - present)
        if missing:
            raise InputError(
                f"the plan quantizes {len(missing)} weights the checkpoint does not have ({prefix}{missing[0]}, ...): "
                "not the model the plan was made for, or it needs prefix="
            )
    changes = _planned_changes(plan)  # after the check: the plan's dims fit the checkpoint's
    config_path = source / "config.json"
    depth = _depth_config(config_path, plan)
    if config_path.exists() and changes and config is None:
        fits, certain = infer_config(config_path, dense, planned, changes, plan, base=depth)
        if len(fits) != 1 or not certain:
            keys = _keys_by_value(_read_json(config_path))
            why = (
                "no change of its sizes that could be inferred gives the architecture those shapes"
                if not fits
                else (
                    "changes of head counts or sizes give the same shapes in several ways ("
                    + " or ".join(map(str, fits))
                    + ", ...) and this plan does not record the model it made, which would tell them "
                    "apart"
                )
                if not certain
                else ("several changes make the model the plan made (" + " or ".join(map(str, fits)) + ")")
            )
            raise InputError(
                f"the plan changes tensor shapes, so config.json needs new sizes, and {why}; pass "
                "config={...} with the keys that change (or config={} to copy it as it is). The plan "
                "changes "
                + "; ".join(
                    f"dims of {old}{' (' + ', '.join(keys[old]) + '?)' if old in keys else ''} "
                    f"to {', '.join(map(str, sorted(new)))}"
                    for old, new in sorted(changes.items())
                )
            )
        config = fits[0]
    if depth:
        config = {**depth, **(config or {})}
    if plan.quantization is not None:
        config = {
            **(config or {}),
            "quantization_config": compressed_tensors.quantization_config(plan.quantization, prefix),
        }
    return shards, config


def _check_format(plan: PlanFile, format: str | None) -> None:
    """Refuse a format the plan cannot be written in, before anything is read."""
    if format not in (None, compressed_tensors.FORMAT):
        raise InputError(f"apply_to_checkpoint format must be None or {compressed_tensors.FORMAT!r}, got {format!r}")
    if plan.quantization is None and format is not None:
        raise InputError(f"format={format!r} writes quantized weights, and this plan does not quantize")
    if plan.quantization is not None and format is None:
        raise InputError(
            f"this plan quantizes to {plan.quantization.kind}, which a plain checkpoint cannot carry: pass "
            f"format={compressed_tensors.FORMAT!r} (vLLM and transformers load it), or re-apply the plan to the "
            "model with gp.apply_plan_file"
        )
    if plan.quantization is not None and (why := compressed_tensors.refusal(plan.quantization)) is not None:
        raise InputError(f"cannot write this plan as compressed-tensors: {why}")


def _write(
    partial: Path,
    report: CheckpointReport,
    shards: list[Path],
    plan: PlanFile,
    prefix: str,
    config: dict[str, object],
    identity: dict,
) -> CheckpointReport:
    """Write the pruned checkpoint into ``partial``, skipping shards an interrupted run finished, and
    verify it (a failed verification removes ``partial``; any other failure leaves it to resume)."""
    partial.mkdir(exist_ok=True)
    stamp = partial / STAMP
    stamp.write_text(json.dumps(identity))
    for shard in tqdm(shards, desc="shards", unit="shard", disable=None, leave=False):
        report.bytes_before += shard.stat().st_size
        out = partial / shard.name
        if out.exists():  # finished by an interrupted run (shards are renamed into place whole)
            report.resumed_shards += 1
            report.bytes_after += out.stat().st_size
            continue
        tensors = {}
        with opened(shard) as f:
            metadata = f.metadata()
            for name in f.keys():
                new = _new_name(name, plan, prefix)
                if new is None:  # in a removed block
                    report.tensors_changed.append(name)
                    continue
                tensor = f.get_tensor(name)
                key = _plan_name(new, prefix)
                pruned = plan.planned(key, tensor)
                quantization = plan.quantization
                layer = quantization.layers.get(key or "") if quantization is not None else None
                if pruned is not tensor or new != name or layer is not None:
                    report.tensors_changed.append(name)
                if layer is not None and quantization is not None:
                    quantized = compressed_tensors.quantized_tensors(new, pruned, layer, quantization.kind)
                    tensors.update({k: v.contiguous() for k, v in quantized.items()})
                else:
                    tensors[new] = pruned.contiguous()
        temporary = out.with_name(out.name + ".tmp")
        save_file(tensors, str(temporary), metadata=metadata)
        os.replace(temporary, out)
        report.bytes_after += out.stat().st_size
        del tensors
    _copy_other_files(shards[0].parent, partial, config, report)
    try:
        _verify(partial, plan, prefix)
    except InputError:
        shutil.rmtree(partial)
        raise
    stamp.unlink()
    return report


STAMP = "graphprune-apply.json"  # in the .partial folder: what the run that writes it is applying


def _source_identity(shards: list[Path]) -> dict[str, list]:
    """Each shard's size, mtime (ns) and header digest: a source changed since an interrupted run
    (a re-downloaded or re-saved shard) is told apart from the same path holding the same bytes."""
    identity = {}
    for shard in shards:
        stat = shard.stat()
        with open(shard, "rb") as f:
            head = f.read(8)
            header = f.read(int.from_bytes(head, "little")) if len(head) == 8 else b""
        identity[shard.name] = [stat.st_size, stat.st_mtime_ns, hashlib.sha256(head + header).hexdigest()]
    return identity


def _check_resumable(partial: Path, identity: dict) -> None:
    """Refuse to resume into ``partial`` unless the run that left it applied the same plan, with the
    same options, to the same source bytes: its finished shards would otherwise be stale.  It is
    refused rather than restarted, so that nothing a user may still want is deleted unasked."""
    if not partial.exists():
        return
    if not partial.is_dir():
        raise InputError(
            f"{partial} is a file: graphprune stages the checkpoint there; remove it or name another destination"
        )
    stamp = partial / STAMP
    if not stamp.exists():
        if any(partial.iterdir()):
            raise InputError(f"{partial} holds files but no record of the run that wrote them: remove it first")
        return
    try:
        previous = json.loads(stamp.read_text())
    except (OSError, ValueError):
        previous = {}
    previous = previous if isinstance(previous, dict) else {}
    changed = [key for key in identity if key != "source" and previous.get(key) != identity[key]]
    before = previous.get("source") if isinstance(previous.get("source"), dict) else {}
    shards = sorted(n for n in set(before) | set(identity["source"]) if before.get(n) != identity["source"].get(n))
    if shards:
        changed.append("source shards " + ", ".join(shards[:3]) + (" ..." if len(shards) > 3 else ""))
    if changed:
        raise InputError(
            f"{partial} holds an unfinished run with another plan, source or options (changed since: "
            f"{'; '.join(changed)}), so its finished shards would be stale: remove {partial} to "
            "start again, or re-run with what that run had"
        )


def _check_other_files(source: Path) -> None:
    """Refuse, before writing, JSON files that :func:`_copy_other_files` would have to rewrite but
    cannot read (``config.json``, the shard index)."""
    for path in sorted(source.iterdir()):
        if path.name == "config.json":
            _read_json(path)
        elif path.name.endswith(".safetensors.index.json"):
            index = _read_json(path)
            if not isinstance(index.get("metadata", {}), dict):
                raise InputError(f"{path}: 'metadata' is not an object; is it a safetensors index?")


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``, refused naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not readable JSON ({exc}); fix or remove it") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _check_source(shards: list[Path], plan: PlanFile, prefix: str) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Refuse, before writing anything, a checkpoint that lacks a tensor the plan changes, holds one
    of another shape, or one whose dims the plan's indices, values or masks do not fit (headers only);
    every tensor's shape before and once the plan is applied."""
    shapes = plan.structured[0].shapes if plan.structured else {}
    values, masks = plan.stored_shapes()
    dense, planned = {}, {}
    for shard in shards:
        with opened(shard) as f:
            for name in f.keys():
                shape = list(f.get_slice(name).get_shape())
                new = _new_name(name, plan, prefix)
                if new is None:  # in a removed block
                    continue
                dense[name] = list(shape)
                key = _plan_name(new, prefix)
                if key in shapes and shape != shapes[key]:
                    raise InputError(
                        f"{name} is {shape} in the checkpoint, the plan was made for {shapes[key]}: "
                        "not the same architecture"
                    )
                for k, structured in enumerate(plan.structured):
                    for d, kept in enumerate(structured.slices.get(key, []) if key is not None else []):
                        if kept is None:
                            continue
                        where = f"structured plan {k}'s indices for dim {d} of {name} ({dense[name]} in {shard.name})"
                        if d >= len(shape):
                            raise InputError(f"{where}: the tensor has no dim {d}; not the same architecture")
                        check_kept(kept, shape[d], where)
                        shape[d] = len(kept)
                for kind, recorded in (("new value", values), ("mask", masks)):
                    if key in recorded and recorded[key] != shape:
                        raise InputError(
                            f"the plan's {kind} for {name} is {recorded[key]}, the pruned tensor is "
                            f"{shape}: the plan is damaged or of another model"
                        )
                planned[new] = shape
    missing = sorted(_names(plan) - {_plan_name(n, prefix) for n in planned})
    if missing:
        raise InputError(
            f"{len(missing)} tensors the plan changes are not in the checkpoint (first: "
            f"{prefix + missing[0]!r}); is it of another model, or does it need prefix=?"
        )
    return dense, planned


def _plan_name(name: str, prefix: str) -> str | None:
    """The plan's name of checkpoint tensor ``name`` (None: outside ``prefix``, not the plan's)."""
    return name[len(prefix) :] if name.startswith(prefix) else None


def _new_name(name: str, plan: PlanFile, prefix: str) -> str | None:
    """Checkpoint tensor ``name`` once the plan's blocks are removed (None: it was in one of them)."""
    key = _plan_name(name, prefix)
    if key is None:
        return name
    new = plan.renamed(key)
    return None if new is None else prefix + new


def _depth_config(config_path: Path, plan: PlanFile) -> dict[str, object]:
    """The ``config.json`` entries a block removal changes: the layer count (under the key the file
    uses, ``n_layer`` for GPT-2) and the lists of one entry per layer; refused where the file's layer
    count is not the plan's block count."""
    if plan.depth is None or not config_path.exists():
        return {}
    data = _read_json(config_path)
    key = _layer_count_key(config_path.parent, data)
    if data.get(key) != plan.depth.count:
        raise InputError(
            f"the plan removes blocks of the {plan.depth.count}-block list {plan.depth.blocks}, but {config_path} "
            f"says {key} = {data.get(key)!r}: not the model the plan was made for"
        )
    kept = plan.depth.kept
    changed: dict[str, object] = {key: len(kept)}
    for name, value in per_layer_lists(data, plan.depth.count).items():
        changed[name] = [value[i] for i in kept]
    return changed


def _layer_count_key(folder: Path, data: dict) -> str:
    """The key of ``config.json`` that holds the layer count: ``num_hidden_layers``, or the name the
    architecture's config class maps it to."""
    if "num_hidden_layers" in data:
        return "num_hidden_layers"
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(folder))
    except (ImportError, ValueError, KeyError, OSError):
        return "num_hidden_layers"
    return type(config).attribute_map.get("num_hidden_layers", "num_hidden_layers")


def _names(plan: PlanFile) -> set[str]:
    """Tensors the plan changes: sliced by a structured plan, given new values, or masked."""
    return {n for p in plan.structured for n in p.slices} | set(plan.values) | set(plan.masks)


MAX_CONFIG_TRIALS = 256  # architectures built on meta while searching for the config change


def infer_config(
    config_path: Path,
    dense: dict[str, list[int]],
    planned: dict[str, list[int]],
    changes: dict[int, set[int]],
    plan: PlanFile | None = None,
    *,
    base: dict[str, object] | None = None,
) -> tuple[list[dict], bool]:
    """The changes of fewest ``config.json`` sizes for which the architecture, built on ``meta``, is
    the model the plan made, and whether that is certain.

    Candidates: a key holding a size the plan changes may take each new size; a key dividing such a
    size (a head count, a head size) may scale with it.  Only keys that change shapes on their own,
    and keep the same tensors, are searched (not token ids, not the layer count).  A candidate must
    give every checkpoint tensor its planned shape.  Shapes cannot tell eight heads of 12 dims from
    six of 16, so where the plan records the fingerprint of the model it made (:attr:`Plan.result`,
    with its example input shapes, and the dense architecture here analyses to the plan's own
    fingerprint) the candidate must analyse to it too.  Without that record a fit is certain only
    if no key in it was scaled.  Nothing is found if transformers does not know the architecture."""
    data = _read_json(config_path)
    base = base or {}  # changes already decided (a block removal's), under every candidate
    dense_shapes = _architecture_shapes(config_path.parent, base)
    if not dense_shapes:
        return [], False
    options: dict[str, list[int]] = {}
    scaled: dict[str, set[int]] = {}
    for key, value in data.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            continue
        new = set(changes.get(value, ()))
        for old, news in changes.items():
            if value < old and old % value == 0:
                multiples = {value * n // old for n in news if value * n % old == 0 and value * n >= old}
                scaled[key] = scaled.get(key, set()) | (multiples - new)
                new |= multiples
        new.discard(value)
        relevant = [
            v
            for v in sorted(new)
            if (alone := _architecture_shapes(config_path.parent, {**base, key: v}))
            and alone.keys() == dense_shapes.keys()
            and alone != dense_shapes
        ]
        if relevant:
            options[key] = relevant
    record = _recorded_result(config_path.parent, plan, base)
    trials = 0
    for count in range(1, len(options) + 1):
        fits = []
        for keys in itertools.combinations(sorted(options), count):
            for values in itertools.product(*(options[k] for k in keys)):
                trials += 1
                if trials > MAX_CONFIG_TRIALS:
                    return [], False
                candidate = dict(zip(keys, values))
                shapes = _architecture_shapes(config_path.parent, {**base, **candidate}) or {}
                if all(shapes.get(n) == shape for n, shape in planned.items()):
                    fits.append(candidate)
        if record is not None:
            fits = [f for f in fits if _fingerprint(config_path.parent, {**base, **f}, plan.inputs) == record]
            if fits:
                return fits, True
        elif fits:
            return fits, not any(v in scaled.get(k, ()) for f in fits for k, v in f.items())
    return [], False


def _recorded_result(folder: Path, plan: PlanFile | None, base: dict[str, object]) -> str | None:
    """The fingerprint of the model the plan made, if the architecture here analyses the way the
    plan's did (its dense form has the plan's own fingerprint); else None."""
    if plan is None or not plan.structured or not plan.inputs or not plan.structured[-1].result:
        return None
    if _fingerprint(folder, base, plan.inputs) != plan.structured[0].fingerprint:
        return None  # another class (a prefix), other analysis options: its fingerprints say nothing
    return plan.structured[-1].result


def _fingerprint(folder: Path, overrides: dict[str, object], inputs: dict) -> str | None:
    """The analysis fingerprint of the architecture with ``overrides``, built and captured on ``meta``."""
    import transformers

    data = _read_json(folder / "config.json")
    config = transformers.AutoConfig.from_pretrained(str(folder))
    for key, value in overrides.items():
        setattr(config, key, value)
    with torch.device("meta"):
        model = getattr(transformers, data["architectures"][0])(config)
    try:
        return analyze(model, spec_inputs(inputs)).fingerprint
    except GraphpruneError:  # a candidate the capture refuses is not the plan's model
        return None


def _planned_changes(plan: PlanFile) -> dict[int, set[int]]:
    """Dense size -> the sizes that dims of that size become (over all sliced tensors and dims)."""
    changes: dict[int, set[int]] = {}
    if not plan.structured:
        return changes
    shapes = {n: list(s) for n, s in plan.structured[0].shapes.items()}
    for structured in plan.structured:
        for name, dims in structured.slices.items():
            shape = shapes.get(name)
            if shape is None:  # a buffer: its sizes follow the parameters'
                continue
            for d, kept in enumerate(dims):
                if kept is not None:
                    changes.setdefault(shape[d], set()).add(len(kept))
                    shape[d] = len(kept)
    return changes


def _keys_by_value(config: dict) -> dict[int, list[str]]:
    """Integer config keys by value: hints for which keys a changed dim may be (never applied)."""
    keys: dict[int, list[str]] = {}
    for key, value in config.items():
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            keys.setdefault(value, []).append(key)
    return keys


def _digest(plan: PlanFile) -> str:
    """A stable identity of the plan's decisions (to refuse resuming with another plan)."""
    h = hashlib.sha256()
    if plan.depth is not None:
        h.update(json.dumps(["depth", plan.depth.blocks, plan.depth.count, list(plan.depth.removed)]).encode())
    for k, structured in enumerate(plan.structured):
        h.update(
            json.dumps(
                [k, structured.fingerprint, sorted(structured.keep.items()), sorted(structured.slices.items())]
            ).encode()
        )
    for name in sorted(plan.masks):
        h.update(name.encode())
        h.update(plan.masks[name].mask.to(torch.uint8).numpy().tobytes())
    for name in sorted(plan.values):  # values of one run come with its masks: names suffice
        h.update(f"value/{name}".encode())
    return h.hexdigest()


def _copy_other_files(
    source: Path,
    partial: Path,
    config: dict[str, object],
    report: CheckpointReport,
) -> None:
    """The files beside the shards: ``config.json`` with ``config`` applied, the shard index with
    the new total size and the written tensors' shards, the rest copied."""
    for path in sorted(source.iterdir()):
        if path.suffix == ".safetensors" or not path.is_file():
            continue
        target = partial / path.name
        if path.name == "config.json":
            data = _read_json(path)
            report.config = {k: v for k, v in config.items() if data.get(k) != v}
            data.update(config)
            target.write_text(json.dumps(data, indent=2) + "\n")
        elif path.name.endswith(".safetensors.index.json"):
            index = _read_json(path)
            index.setdefault("metadata", {})["total_size"] = _tensor_bytes(partial)
            if isinstance(index.get("weight_map"), dict):
                index["weight_map"] = {
                    name: shard.name for shard in sorted(partial.glob("*.safetensors")) for name in _keys(shard)
                }
            target.write_text(json.dumps(index, indent=2) + "\n")
        else:
            shutil.copy2(path, target)


def _keys(shard: Path) -> list[str]:
    with opened(shard) as f:
        return list(f.keys())


def _tensor_bytes(folder: Path) -> int:
    total = 0
    for shard in sorted(folder.glob("*.safetensors")):
        with opened(shard) as f:
            for name in f.keys():
                piece = f.get_slice(name)
                total += int(torch.Size(piece.get_shape()).numel()) * _itemsize(piece.get_dtype())
    return total


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}.get(
        dtype, 1
    )


def _verify(folder: Path, plan: PlanFile, prefix: str) -> None:
    """Planned shapes, N:M patterns on the written values, and the config's own shapes."""
    written: dict[str, list[int]] = {}
    quantized = set(plan.quantization.layers) if plan.quantization is not None else set()
    for shard in sorted(folder.glob("*.safetensors")):
        with opened(shard) as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()} if plan.quantization is not None else {}
            for name in f.keys():
                written[name] = list(f.get_slice(name).get_shape())
                key = _plan_name(name, prefix) or ""
                record = None if key in quantized else plan.masks.get(key)  # quantized: checked below
                if record is not None and not satisfies(f.get_tensor(name), record.pattern):
                    raise InputError(f"{name}: the written tensor breaks its {record.pattern} pattern")
            for layer in plan.quantization.layers.values() if plan.quantization is not None else []:
                weight = compressed_tensors.dequantized(tensors, prefix + layer.module)
                if weight is None:
                    continue
                written[f"{prefix}{layer.module}.weight"] = list(weight.shape)
                record = plan.masks.get(f"{layer.module}.weight")
                if record is not None and not satisfies(weight, record.pattern):
                    raise InputError(f"{prefix}{layer.module}: the written weights break its {record.pattern} pattern")
    config_path = folder / "config.json"
    if not config_path.exists():
        return
    expected = _architecture_shapes(folder)
    if expected is None:
        return
    wrong = [
        f"{n}: written {written[n]}, config gives {expected[n]}"
        for n in sorted(written)
        if n in expected and expected[n] != written[n]
    ]
    if wrong:
        raise InputError(
            f"config.json does not match the pruned tensors ({len(wrong)} differ; first: {wrong[0]}); "
            "pass the right sizes in config={...}"
        )


def _architecture_shapes(folder: Path, overrides: dict[str, object] | None = None) -> dict[str, list[int]] | None:
    """Parameter shapes of the architecture ``folder/config.json`` names (with ``overrides``), built
    on ``meta`` (no memory); None when transformers is missing or does not know the architecture,
    ``{}`` when the architecture rejects the overrides."""
    try:
        import transformers
    except ImportError:
        return None
    data = _read_json(folder / "config.json")
    architectures = data.get("architectures")
    named = isinstance(architectures, list) and architectures and isinstance(architectures[0], str)
    cls = getattr(transformers, architectures[0], None) if named else None
    if cls is None:
        return None
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, OSError) as exc:
        raise InputError(f"{folder / 'config.json'}: transformers cannot read it: {exc}") from exc
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    try:
        with torch.device("meta"):
            model = cls(config)
    except (ValueError, AssertionError, RuntimeError) as exc:  # sizes the architecture's own checks reject
        if overrides:
            return {}
        raise InputError(f"config.json: transformers cannot build {architectures[0]} from it: {exc}") from exc
    return {n: list(t.shape) for n, t in model.state_dict().items()}
