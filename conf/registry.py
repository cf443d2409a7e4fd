"""The name -> stage registry that `algo=<name>` refers to: every stage (RL or not) is registered once.

    @register_stage("rloo", RLOOConfig, kind="rl", objective="reward/total_mean")
    def build_rloo(ctx: StageContext) -> Built: ...

A stage's entry says everything the rest of the project needs to know about it, so that run.py, the
config schema, the pipeline and the memory projection read it here instead of listing names:
- `config`: the dataclass of `algo.*` (types, choices and the only defaults; conf/algo/<name>.yaml
  names the choice and holds overrides);
- `kind`: how run.py runs it — `rl` and `supervised` stages are built (`build(ctx) -> Built`) and run by
  the one training loop (training.loop.Trainer: resume, Ctrl-C checkpoints, the NaN guard, logging);
  `pass` stages (eval, rejection sampling) are one pass over the data (`run(ctx) -> metrics`); a
  `driver` (the pipeline) runs other stages and loads no model itself;
- `trains_policy`: it writes checkpoints/final, a policy the next pipeline stage starts from;
- `uses_rewards`: it scores samples with the configured reward functions;
- `objective`: the metric run.py returns to a sweeper (Optuna, ...): its held-out value (`eval/<objective>`)
  at the end of the run when the run measured one, else the last step's;
- `models`: the models an RL algorithm keeps besides the actor (`reference`, `critic`): the memory
  projection (models.memory) counts them. When they depend on the config (PPO with a group baseline
  builds no critic), `models` is a function of `algo.*` and `Stage.kept_models(cfg)` evaluates it
  (`Stage.models` holds its value at the defaults).

Modules register on import; `discover()` imports every module of STAGE_PACKAGES (run.py calls it), so
a new algorithm needs no line anywhere else. This module imports none of them: it stays at the bottom
of the import graph, and the modules that register point down to it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore

KINDS = ("rl", "supervised", "pass", "driver")
STAGE_PACKAGES = ("algorithms", "stages")  # packages whose modules may register stages
SCHEMA_GROUP = "schema/algo"  # ConfigStore group of the stage dataclasses (conf/algo/*.yaml extend them)


class UnknownStage(ValueError):
    """`algo=<name>` names no registered stage; the message lists the valid ones."""


@dataclass(frozen=True)
class Stage:
    name: str
    config: type  # dataclass of algo.*
    kind: str  # rl | supervised | pass | driver
    build: Callable[..., Any] | None = None  # rl, supervised: build(ctx) -> Built (training.loop)
    run: Callable[..., Any] | None = None  # pass, driver: run(ctx) -> metrics
    trains_policy: bool = False
    uses_rewards: bool = False
    objective: str | None = None
    models: tuple[str, ...] = ()  # models kept besides the actor at the default config: reference, critic
    models_fn: Callable[[Any], tuple[str, ...]] | None = None  # the same for a given algo config

    def kept_models(self, algo_cfg: Any = None) -> tuple[str, ...]:
        """The models kept besides the actor under `algo_cfg` (the stage's config dataclass; None: defaults)."""
        if self.models_fn is None or algo_cfg is None:
            return self.models
        return tuple(self.models_fn(algo_cfg))

    @property
    def looped(self) -> bool:
        """Run by the training loop (so it gets resume, interrupts and the NaN guard)."""
        return self.kind in ("rl", "supervised")


STAGES: dict[str, Stage] = {}
# "done": discover() ran: STAGES holds every stage, not only those imported so far
_discovered: dict[str, bool] = {"done": False}


def register_stage(
    name: str,
    config: type,
    *,
    kind: str,
    trains_policy: bool = False,
    uses_rewards: bool = False,
    objective: str | None = None,
    models: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = (),
) -> Callable:
    """Decorator on a stage's builder (kind rl / supervised) or runner (pass / driver); returns it unchanged.
    `models`: a tuple, or a function of the stage's config that returns one.

    Also stores `config` in Hydra's ConfigStore as `schema/algo/<name>`, which conf/algo/<name>.yaml
    extends (`defaults: [/schema/algo/<name>@_here_, _self_]`), so the dataclass holds the only defaults.
    """
    if kind not in KINDS:
        raise ValueError(f"stage {name!r}: kind={kind!r}; choose one of: {', '.join(KINDS)}")

    def decorator(fn: Callable) -> Callable:
        old = STAGES.get(name)
        old_fn = None if old is None else old.build or old.run
        if old_fn is not None and old_fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"stage {name!r} is already registered by {old_fn.__module__}")
        looped = kind in ("rl", "supervised")
        if callable(models):
            models_fn: Callable[[Any], tuple[str, ...]] | None = models
            kept = tuple(models(config()))
        else:
            models_fn, kept = None, tuple(models)
        STAGES[name] = Stage(
            name,
            config,
            kind,
            build=fn if looped else None,
            run=None if looped else fn,
            trains_policy=trains_policy,
            uses_rewards=uses_rewards,
            objective=objective,
            models=kept,
            models_fn=models_fn,
        )
        ConfigStore.instance().store(group=SCHEMA_GROUP, name=name, node=config)
        return fn

    return decorator


def discover() -> dict[str, Stage]:
    """Import every module of STAGE_PACKAGES once, so that each registers its stages; returns STAGES."""
    if _discovered["done"]:
        return STAGES
    _discovered["done"] = True  # first: a module that looks a stage up while it is imported must not recurse
    for package_name in STAGE_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package_name}.{info.name}")
    return STAGES


def get_stage(name: str) -> Stage:
    discover()
    if name not in STAGES:
        raise UnknownStage(f"algo={name!r} is not valid; choose one of: {', '.join(sorted(STAGES))}")
    return STAGES[name]


def stage_names(kind: str | None = None, trains_policy: bool | None = None) -> tuple[str, ...]:
    """Registered stage names, optionally only those of one kind / that train a policy."""
    discover()
    return tuple(
        sorted(
            name
            for name, s in STAGES.items()
            if (kind is None or s.kind == kind) and (trains_policy is None or s.trains_policy == trains_policy)
        )
    )
