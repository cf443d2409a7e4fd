"""The name -> reward function registry that `conf/reward/*.yaml` refers to.

A reward function has the signature

    fn(prompts: list[str], completions: list[str], **columns, **kwargs) -> list[float]

- `prompts[i]` is the text the policy was conditioned on and `completions[i]` what it generated;
- `columns` are per-sample lists aligned with `completions`, one per key of the data rows
  (`answer`, `reference`, `question`, `cot`, `options`, `kind`, `id`, `prompt`, ...);
- `kwargs` are the reward's configured options (`reward.options.<name>`), plain keyword arguments.

Contract for authors: accept and ignore columns you do not use (`**_`), declare every option as a
named keyword parameter (unknown option keys are rejected against the signature), validate options
at the top of the function with `ConfigError` (the combiner calls each function once with an empty
batch when it is built, so bad options fail before any model is loaded) and return one float per
completion.
"""

from __future__ import annotations

from collections.abc import Callable

RewardFn = Callable[..., list[float]]

# The data-row keys every data set provides; the build-time dry call passes them as empty lists.
STANDARD_COLUMNS: tuple[str, ...] = (
    "answer",
    "reference",
    "question",
    "cot",
    "options",
    "kind",
    "id",
    "prompt",
)

REWARDS: dict[str, RewardFn] = {}


def _ident(fn: object) -> str:
    qualname = getattr(fn, "__qualname__", type(fn).__qualname__)
    return f"{getattr(fn, '__module__', type(fn).__module__)}.{qualname}"


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` available to configs as `name`; returns `fn` unchanged.

    Works on functions and on callable objects (`register("reward_model")(scorer)`). Registering a
    different callable under a taken name is an error (two rewards silently swapping is worse than a
    crash at import); re-registering the same definition (a module reload) is allowed.
    """

    def decorator(fn: RewardFn) -> RewardFn:
        old = REWARDS.get(name)
        if old is not None and old is not fn and _ident(old) != _ident(fn):
            raise ValueError(f"reward {name!r} is already registered by {_ident(old)}")
        REWARDS[name] = fn
        return fn

    return decorator
