"""Every option of a composed config with its value and its help, read from where it is declared.

    python run.py algo=grpo --help           # the same as: python -m conf.help algo=grpo
    python -m conf.help algo=ppo trainer=h100 trainer.lr=1e-5

The help of each option is the `help` of its dataclass field (conf.options.option); the values are those
`python run.py <overrides>` would run with. The docs' option tables are made from the same rows
(experiments/gen_options.py), so the command line and the pages cannot disagree.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Iterator
from typing import Any

from conf.options import option_help

SHOWN_GROUPS = ("algo", "model", "data", "reward", "trainer", "logger")  # the groups a user picks from


@dataclasses.dataclass(frozen=True)
class OptionRow:
    key: str  # the dotted name on the command line: algo.clip_high
    type: str  # int, float, str | None, ...
    value: Any  # the value under the composed config (or the schema's default)
    help: str


def _type_name(tp: Any) -> str:
    generic = typing.get_origin(tp) is not None  # list[str], dict[str, float], str | None: spelled out
    text = tp if isinstance(tp, str) or generic else getattr(tp, "__name__", str(tp))
    return str(text).replace("typing.", "")


def option_rows(instance: Any, prefix: str, skip: tuple[str, ...] = ()) -> Iterator[OptionRow]:
    """The options of a config dataclass instance with their values, nested dataclasses flattened
    (`trainer.lora.rank`); fields named in `skip` are left out (their rows live elsewhere)."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        if f.name in skip:
            continue
        value = getattr(instance, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from option_rows(value, key)
        else:
            yield OptionRow(key, _type_name(hints.get(f.name, f.type)), value, option_help(f))


def format_value(value: Any) -> str:
    """An option's value as it is written on the command line (null, true, [a, b], 'text')."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value) if value == "" or value != value.strip() or "\n" in value else value
    if isinstance(value, tuple | list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def help_text(overrides: list[str]) -> str:
    """The help page of `python run.py <overrides> --help`: the groups and their choices, then every option of
    the chosen groups with its value and help (the internal `schema/*` groups are never shown)."""
    from conf.registry import discover
    from conf.schema import compose_config, group_choices

    discover()
    cfg = compose_config([o for o in overrides if o not in ("--help", "-h")])
    lines = [
        "python run.py [group=choice ...] [key=value ...]   (-m: a sweep over comma-separated values)",
        "",
        "Groups (`group=choice`; the chosen ones are starred):",
    ]
    chosen = {"algo": cfg.algo.name, "model": cfg.model.name, "reward": cfg.reward.name, "data": cfg.data.name}
    chosen |= {"trainer": cfg.trainer.name, "logger": cfg.logger.name}
    groups = [*SHOWN_GROUPS, "experiment", "hydra/launcher"]
    for group in groups:
        names = [f"*{c}" if chosen.get(group) == c else c for c in group_choices(group)]
        lines.append(f"  {group:<15} {', '.join(names)}")
    for group in SHOWN_GROUPS:
        lines += ["", f"{group}={chosen[group]} options:"]
        rows = list(option_rows(getattr(cfg, group), group))
        width = max(len(r.key) for r in rows)
        for row in rows:
            lines.append(f"  {row.key:<{width}}  {format_value(row.value)}")
            if row.help:
                lines.append(f"  {'':<{width}}    {row.help}")
    lines += [
        "",
        "seed=N (default 0), experiment_name=NAME; `--cfg job` prints the composed YAML, `--hydra-help` Hydra's own.",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from conf.checks import ConfigError

    try:
        print(help_text(argv))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
