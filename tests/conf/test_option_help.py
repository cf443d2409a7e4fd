"""Every option carries its one-line help where it is declared (conf.options.option): `run.py --help` and the
docs' option tables read it from there, so an option added without one fails here, naming its class and field."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from conf.options import option_help
from conf.registry import discover, get_stage, stage_names
from conf.schema import GROUP_SCHEMAS, Config

discover()
ROOTS = {"Config": Config, **GROUP_SCHEMAS, **{f"algo={n}": get_stage(n).config for n in stage_names()}}


def nested_dataclasses(tp: typing.Any) -> typing.Iterator[type]:
    """The dataclasses a field's type holds: itself, or inside Optional, list[...], dict[..., ...]."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        yield tp
    for arg in typing.get_args(tp):
        yield from nested_dataclasses(arg)


def fields_without_help(schema: type, seen: set[type] | None = None) -> list[str]:
    """`Class.field` for every field of `schema` and of the config dataclasses it nests that has no help."""
    seen = set() if seen is None else seen
    if schema in seen:
        return []
    seen.add(schema)
    hints = typing.get_type_hints(schema)
    missing = []
    for f in dataclasses.fields(schema):
        if not option_help(f).strip():
            missing.append(f"{schema.__module__}.{schema.__qualname__}.{f.name}")
        for nested in nested_dataclasses(hints[f.name]):
            missing += fields_without_help(nested, seen)
    return missing


def test_the_walk_reaches_nested_configs():
    reached: set[type] = set()
    for schema in ROOTS.values():
        fields_without_help(schema, reached)
    names = {c.__name__ for c in reached}
    assert {"LoraOptions", "RolloutConfig", "StageConfig"} <= names, names


@pytest.mark.parametrize("root", sorted(ROOTS))
def test_every_option_has_help(root):
    missing = fields_without_help(ROOTS[root])
    assert not missing, (
        f"{root}: options declared without help: {', '.join(missing)}; declare each with "
        'conf.options.option(default, "one-line help") (or option(factory=..., help=...))'
    )
