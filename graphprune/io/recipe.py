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

import difflib
import inspect
import os
import tomllib
import types
import typing
from collections import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from graphprune.core.pipeline import Pass, PassManager
from graphprune.errors import InputError


def available_passes() -> dict[str, type[Pass]]:
    import graphprune.passes as passes

    return {name: getattr(passes, name) for name in passes.__all__}


@dataclass
class Recipe:
    passes: list[Pass]
    experimental_order: bool = False


def load_recipe(source: str | os.PathLike) -> Recipe:
    """Build the passes of a recipe given as a TOML file path or TOML text.  Every table is checked
    against its pass's options (:func:`option_types`) before any pass is built, so a wrong key or
    type stops the recipe with the file, the table and the key named."""
    text, where = source, "recipe (TOML text)"
    if isinstance(source, os.PathLike) or (isinstance(source, str) and source.endswith(".toml")):
        where = f"recipe {os.fspath(source)}"
        try:
            with open(source, "rb") as f:
                text = f.read().decode()
        except OSError as exc:
            raise InputError(f"cannot read {where}: {exc.strerror}") from exc
    if not isinstance(text, str):
        raise InputError(f"a recipe is a path to a .toml file or TOML text, got {type(source).__name__}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{where} is not valid TOML: {exc}") from exc
    unknown_keys = sorted(set(data) - {"pass", "experimental_order"})
    if unknown_keys:
        raise InputError(
            f"{where}: unknown top-level key(s) {unknown_keys}; a recipe has [[pass]] tables "
            "and optionally experimental_order = true"
        )
    experimental_order = data.get("experimental_order", False)
    if not isinstance(experimental_order, bool):
        raise InputError(f"{where}: experimental_order must be true or false, got {experimental_order!r}")
    tables = data.get("pass")
    if not isinstance(tables, list) or not tables:
        raise InputError(f"{where} needs at least one [[pass]] table")
    known = available_passes()
    checked = [_checked_table(where, i, table, known) for i, table in enumerate(tables)]
    passes = []
    for i, (cls, options) in enumerate(checked):
        try:
            passes.append(cls(**options))
        except InputError as exc:  # ranges and choices are the pass's own checks
            raise InputError(f"{where}, pass #{i + 1} ({cls.__name__}): {exc}") from exc
    return Recipe(passes, experimental_order)


def _checked_table(where: str, index: int, table: object, known: dict[str, type[Pass]]) -> tuple[type[Pass], dict]:
    """The pass class and options of one ``[[pass]]`` table, refused unless every key is an option
    of the pass and every value has a type the option takes."""
    if not isinstance(table, dict):
        raise InputError(f"{where}, pass #{index + 1}: expected a [[pass]] table, got {table!r}")
    options = dict(table)
    name = options.pop("name", None)
    if not isinstance(name, str) or name not in known:
        close = difflib.get_close_matches(str(name), list(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"{where}, pass #{index + 1}: unknown pass {name!r}{hint}; available: {sorted(known)}")
    schema = option_types(known[name])
    unknown = [key for key in options if key not in schema]
    if unknown:
        close = {key: difflib.get_close_matches(key, list(schema), n=1) for key in unknown}
        hints = ", ".join(f"{match[0]!r} for {key!r}" for key, match in close.items() if match)
        raise InputError(
            f"{where}, pass #{index + 1} ({name}): unknown option(s) {unknown}"
            f"{f' (did you mean {hints}?)' if hints else ''}; options are {sorted(schema)}"
        )
    for key, value in options.items():
        at = f"{where}, pass #{index + 1} ({name}), key {key!r}"
        want = _toml_forms(schema[key])
        if not want:
            raise InputError(
                f"{at}: this option takes a Python object ({schema[key]}), which a recipe cannot hold; "
                "pass it in code (passes=[...])"
            )
        if not _fits(value, schema[key]):
            raise InputError(f"{at}: expected {' or '.join(want)}, got {value!r} ({type(value).__name__})")
    return known[name], options


def option_types(cls: type[Pass]) -> dict[str, Any]:
    """The options a pass takes and their annotated types: the recipe schema, read off the pass's
    signature so that it cannot drift from the code."""
    hints = typing.get_type_hints(cls.__init__)
    return {
        p.name: hints.get(p.name, Any)
        for p in inspect.signature(cls).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


_SCALARS: dict[Any, tuple[str, str]] = {
    bool: ("true or false", "booleans"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
}


def _fits(value: object, annotation: Any) -> bool:
    """Whether a TOML value fits a type annotation (TOML has no null: ``None`` is left out)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arm) for arm in args)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (dict, Mapping, abc.Mapping) and len(args) == 2:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if origin in (list, tuple, abc.Iterable, abc.Sequence) and args:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    return False


def _toml_forms(annotation: Any, plural: bool = False) -> list[str]:
    """What a recipe may write for an option of this type, in words (empty: nothing)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return [form for arm in args for form in _toml_forms(arm, plural)]
    if annotation in _SCALARS:
        return [_SCALARS[annotation][plural]]
    if origin in (dict, Mapping, abc.Mapping) and len(args) == 2:
        keys, values = _toml_forms(args[0], True), _toml_forms(args[1], True)
        return [f"a table of {' or '.join(values)} keyed by {' or '.join(keys)}"] if keys and values else []
    if origin in (list, tuple, abc.Iterable, abc.Sequence) and args:
        items = _toml_forms(args[0], True)
        return [f"an array of {' or '.join(items)}"] if items else []
    return []


def pass_manager(
    passes: Sequence[Pass] | None, recipe: str | os.PathLike | None, experimental_order: bool
) -> PassManager:
    """The pass manager for exactly one of ``passes`` or a TOML ``recipe`` (whose own
    ``experimental_order = true`` also allows experimental orders), with graphprune's fusion rules
    (``graphprune.passes.FUSIONS``: adjacent passes that share one sweep over the calibration data)."""
    if (passes is None) == (recipe is None):
        raise InputError("give exactly one of passes=[...] or recipe=...")
    if recipe is not None:
        loaded = load_recipe(recipe)
        passes, experimental_order = loaded.passes, experimental_order or loaded.experimental_order
    import graphprune.passes as known

    return PassManager(list(passes), experimental_order=experimental_order, fusions=known.FUSIONS)
