"""`option(default, help)`: a config field that carries its one-line help.

Every config dataclass declares its fields with it, so the help lives where the option is declared and
every surface reads it from there: `python run.py ... --help` (conf.help) and the option tables of the
docs (experiments/gen_options.py). A plain `field()` works too; its option is listed without help.

    lr: float = option(5e-5, "AdamW learning rate of the actor")
    tags: list[str] = option(factory=list, help="wandb tags of the run")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with `metadata={"help": help}`; `factory` for mutable defaults (lists, dicts, configs)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def option_help(f: dataclasses.Field) -> str:
    """The help of a dataclass field ('' when it was declared without one)."""
    return str(f.metadata.get("help", ""))
