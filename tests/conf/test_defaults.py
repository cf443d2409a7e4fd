"""One source of defaults: the config dataclasses. A YAML in conf/<group>/ holds only what makes its choice
differ (conf/schema.py says why); these tests fail when a default is written twice or a choice is invalid."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conf.registry import discover, get_stage
from conf.schema import GROUP_SCHEMAS, validate

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
STAGES = discover()


def schema_defaults(schema: type) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(schema), resolve=False)


def raw(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def inherited(group: str, path: Path) -> dict:
    """What a YAML of `group` starts from: its schema's defaults, then the group configs it extends."""
    node = raw(path)
    entries = [e for e in node.get("defaults", []) if isinstance(e, str) and e != "_self_"]
    schema = [e for e in entries if e.startswith("/schema/")]
    if group == "algo":
        assert schema == [f"/schema/algo/{path.stem}@_here_"], f"{path} must extend /schema/algo/{path.stem}@_here_"
        base = schema_defaults(get_stage(path.stem).config)
    else:
        base = schema_defaults(GROUP_SCHEMAS[group])
    for parent in (e for e in entries if not e.startswith("/")):
        values = {k: v for k, v in raw(CONF / group / f"{parent}.yaml").items() if k != "defaults"}
        base = OmegaConf.to_container(OmegaConf.merge(base, values), resolve=False)
    return base


def repeats(values: dict, base: dict, prefix: str = "") -> list[str]:
    """Keys of `values` whose value equals the one in `base` (nested dicts compared key by key)."""
    found = []
    for key, value in values.items():
        if key == "defaults" or key not in base:
            continue
        if isinstance(value, dict) and isinstance(base[key], dict):
            found += repeats(value, base[key], f"{prefix}{key}.")
        elif value == base[key]:
            found.append(f"{prefix}{key}: {value!r}")
    return found


GROUP_FILES = [(group, path) for group in [*GROUP_SCHEMAS, "algo"] for path in sorted((CONF / group).glob("*.yaml"))]


@pytest.mark.parametrize("group,path", GROUP_FILES, ids=lambda x: getattr(x, "name", x))
def test_no_yaml_repeats_a_default(group: str, path: Path):
    found = repeats(raw(path), inherited(group, path))
    assert not found, f"{path.relative_to(ROOT)} repeats defaults of its schema: {found}; delete them"


@pytest.mark.parametrize("group,path", GROUP_FILES, ids=lambda x: getattr(x, "name", x))
def test_every_choice_composes_and_validates(group: str, path: Path):
    overrides = [f"{group}={path.stem}"] if path.stem != "pipeline" else ["experiment=r1_pipeline"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = validate(compose(config_name="config", overrides=overrides))
    assert getattr(cfg, group).name == path.stem  # a choice is named after its file


def test_every_stage_has_its_yaml_and_every_yaml_a_stage():
    assert sorted(STAGES) == sorted(p.stem for p in (CONF / "algo").glob("*.yaml"))


def test_no_config_subclass_redeclares_a_default_unchanged():
    classes = {get_stage(name).config for name in STAGES} | set(GROUP_SCHEMAS.values())
    same = []
    for cls in classes:
        for base in cls.__mro__[1:]:
            if not dataclasses.is_dataclass(base):
                continue
            own = {f.name: f for f in dataclasses.fields(base)}
            for f in dataclasses.fields(cls):
                if (
                    f.name in own
                    and f.name != "name"
                    and f.default is not dataclasses.MISSING
                    and f.default == own[f.name].default
                    and f.name in inspect.get_annotations(cls)
                ):
                    same.append(f"{cls.__name__}.{f.name} = {f.default!r} (as in {base.__name__})")
    assert not same, f"defaults declared twice: {same}"


def test_the_repeat_detector_finds_a_repeat():
    assert repeats({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 0, "d": 3}}) == ["a: 1", "b.d: 3"]
