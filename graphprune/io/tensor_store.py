"""Tensors kept on disk in safetensors files and read one at a time.

Two uses share it: a checkpoint (a folder of shards) read tensor by tensor, and the large part of
a plan (N:M masks, SparseGPT's updated weights), which for a 7B model is gigabytes and is written
in parts of bounded size rather than built in memory.  Reading opens each file's header only;
a tensor's bytes are read when it is asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from graphprune.errors import InputError

PART_BYTES = 1 << 30  # a part file holds at most about this much (one tensor may exceed it)


@contextlib.contextmanager
def opened(path: str | os.PathLike) -> Iterator:
    """``safe_open(path)``, refused with an :class:`InputError` naming the file when it is missing or
    not a whole safetensors file (safetensors checks that the header's offsets cover the file)."""
    try:
        handle = safe_open(os.fspath(path), "pt")
    except (SafetensorError, OSError) as exc:
        raise InputError(
            f"{os.fspath(path)} is not a readable safetensors file ({exc}); was it truncated or replaced?"
        ) from exc
    with handle as f:
        yield f


class TensorFiles(Mapping[str, torch.Tensor]):
    """Name -> tensor over safetensors files, each tensor read from disk when it is asked for."""

    def __init__(self, files: Sequence[str | os.PathLike]) -> None:
        self.files = [str(f) for f in files]
        self._where: dict[str, str] = {}
        self._shapes: dict[str, list[int]] = {}
        self._dtypes: dict[str, str] = {}
        for path in self.files:
            with opened(path) as f:
                for name in f.keys():
                    if name in self._where:
                        raise InputError(f"tensor {name!r} is stored twice: in {self._where[name]} and {path}")
                    self._where[name] = path
                    piece = f.get_slice(name)
                    self._shapes[name], self._dtypes[name] = list(piece.get_shape()), piece.get_dtype()

    @classmethod
    def folder(cls, folder: str | os.PathLike) -> "TensorFiles":
        """Every ``.safetensors`` file of a checkpoint folder (or the one file named)."""
        path = Path(folder)
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) if path.is_dir() else []
        if not files:
            raise InputError(f"{path}: no .safetensors files (weights are read from safetensors checkpoints only)")
        for index in sorted(path.glob("*.safetensors.index.json")) if path.is_dir() else []:
            missing = sorted(set(_indexed_shards(index)) - {f.name for f in files})
            if missing:
                raise InputError(
                    f"{index} names shards that are not in the folder: {', '.join(missing)} (a download cut short?)"
                )
        return cls(files)

    def shape(self, name: str) -> list[int]:
        return self._shapes[name]

    def where(self, name: str) -> str:
        """The file that holds ``name``."""
        return self._where[name]

    def dtype(self, name: str) -> str:
        """The stored dtype in safetensors' spelling (``I64``), from the header."""
        return self._dtypes[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        with opened(self._where[name]) as f:
            return f.get_tensor(name)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _indexed_shards(index: Path) -> list[str]:
    """The shard files a ``*.safetensors.index.json`` maps tensors to."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return [str(v) for v in dict(weight_map).values()]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{index}: not a safetensors index (a JSON object with a weight_map): {exc}") from exc


class PartWriter:
    """Writes tensors into ``<stem>.safetensors``, then ``<stem>-00002.safetensors``, ..., each
    about :data:`PART_BYTES`, holding at most one part in memory.

    ``claim`` (e.g. :meth:`graphprune.io.outputs.Outputs.claim`) is asked for each part as it is
    started, since the number of parts is known only at the end: it may refuse the target and
    returns where to write it.  ``metadata`` goes into every part's header."""

    def __init__(
        self,
        stem: str | os.PathLike,
        part_bytes: int | None = None,
        *,
        claim: Callable[[str], str] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.stem, self.part_bytes = str(stem), part_bytes or PART_BYTES
        self.files: list[str] = []  # the parts' target paths
        self._written: list[str] = []  # where each was written (its staged path under a claim)
        self._claim, self._metadata = claim, metadata
        self._pending: dict[str, torch.Tensor] = {}
        self._bytes = 0

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self._pending[name] = tensor.detach().cpu().contiguous()
        self._bytes += tensor.numel() * tensor.element_size()
        if self._bytes >= self.part_bytes:
            self.flush()

    def flush(self, last: bool = False) -> None:
        """Write the pending tensors as the next part (``last``: even none, if no part exists yet)."""
        if not self._pending and not (last and not self.files):
            return
        path = f"{self.stem}.safetensors" if not self.files else f"{self.stem}-{len(self.files) + 1:05d}.safetensors"
        written = self._claim(path) if self._claim is not None else path
        save_file(self._pending, written, metadata=self._metadata)
        self.files.append(path)
        self._written.append(written)
        self._pending, self._bytes = {}, 0

    def close(self) -> TensorFiles:
        """Write what is pending; the written tensors, read back lazily (where they were written)."""
        self.flush(last=True)
        return TensorFiles(self._written)


def file_format(path: str) -> str | None:
    """The ``format`` a safetensors file's header names (what marks a file graphprune wrote), or None
    for a file that is not one or names none."""
    try:
        with opened(path) as f:
            metadata = f.metadata() or {}
    except InputError:
        return None
    return metadata.get("format")
