"""Recipes: a pass pipeline written as TOML.

```toml
[[pass]]
name = "ChannelPrune"
ratio = 0.5
round_to = 8
```
Each table names a pass from :mod:`graphprune.passes`; the other keys are its options.  The one
top-level key, ``experimental_order = true``, lets passes run on stages they accept only for
experiments (see :class:`graphprune.Pass`).
"""

from __future__ import annotations

import inspect
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass

from graphprune.errors import InputError
from graphprune.pipeline import Pass, PassManager


def available_passes() -> dict[str, type[Pass]]:
    import graphprune.passes as passes

    return {name: getattr(passes, name) for name in passes.__all__}


@dataclass
class Recipe:
    passes: list[Pass]
    experimental_order: bool = False


def load_recipe(source: str | os.PathLike) -> Recipe:
    """Build the passes of a recipe given as a TOML file path or TOML text."""
    text = source
    if isinstance(source, os.PathLike) or (isinstance(source, str) and source.endswith(".toml")):
        try:
            with open(source, "rb") as f:
                text = f.read().decode()
        except OSError as exc:
            raise InputError(f"cannot read recipe {source}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"recipe is not valid TOML: {exc}") from exc
    unknown_keys = sorted(set(data) - {"pass", "experimental_order"})
    if unknown_keys:
        raise InputError(f"recipe: unknown top-level key(s) {unknown_keys}; a recipe has [[pass]] tables "
                         "and optionally experimental_order = true")
    experimental_order = data.get("experimental_order", False)
    if not isinstance(experimental_order, bool):
        raise InputError(f"recipe: experimental_order must be true or false, got {experimental_order!r}")
    tables = data.get("pass")
    if not isinstance(tables, list) or not tables:
        raise InputError("a recipe needs at least one [[pass]] table")
    known = available_passes()
    passes = []
    for i, table in enumerate(tables):
        options = dict(table)
        name = options.pop("name", None)
        if name not in known:
            raise InputError(f"recipe pass #{i + 1}: unknown pass {name!r}; available: {sorted(known)}")
        params = inspect.signature(known[name]).parameters
        unknown = [k for k in options if k not in params]
        if unknown:
            raise InputError(f"recipe pass #{i + 1} ({name}): unknown option(s) {unknown}; "
                             f"options are {[p for p in params if p != 'self']}")
        passes.append(known[name](**options))
    return Recipe(passes, experimental_order)


def pass_manager(passes: Sequence[Pass] | None, recipe: str | os.PathLike | None,
                 experimental_order: bool) -> PassManager:
    """The pass manager for exactly one of ``passes`` or a TOML ``recipe`` (whose own
    ``experimental_order = true`` also allows experimental orders)."""
    if (passes is None) == (recipe is None):
        raise InputError("give exactly one of passes=[...] or recipe=...")
    if recipe is not None:
        loaded = load_recipe(recipe)
        passes, experimental_order = loaded.passes, experimental_order or loaded.experimental_order
    return PassManager(list(passes), experimental_order=experimental_order)
