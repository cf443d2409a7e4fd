"""Weighted combination of reward functions, robust to any one of them failing.

`build_reward(cfg.reward)` turns `conf/reward/*.yaml` into a `CombinedReward`; calling it on a
rollout batch returns the total reward per completion plus the unweighted components and failure
counts for logging. A reward that raises, returns the wrong number of scores or a non-finite score
counts as 0 for the affected samples and is counted -- it never crashes a run. With a time limit
(`reward.timeout_s`), one that takes longer on a batch scores 0 for it, counted as a timeout
(rewards.timeout: the call is abandoned in its thread, not killed).
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from omegaconf import DictConfig, OmegaConf

from conf.schema import ConfigError, RewardConfig
from rewards.registry import REWARDS, STANDARD_COLUMNS, RewardFn
from rewards.timeout import RewardTimeout, call_before

log = logging.getLogger(__name__)

# Supplied by the training code (it needs a trained model), not by the registry.
_CALLER_SUPPLIED = {"reward_model": "pass the trained scorer as extra={'reward_model': scorer}"}


@dataclass
class RewardOutput:
    """Scores of one batch of N completions."""

    total: torch.Tensor  # [N] float32, sum over components of weight * score
    parts: dict[str, torch.Tensor]  # name -> [N] float32, unweighted component scores
    failures: dict[str, int]  # name -> samples that raised or returned NaN/inf (scored 0)
    model_tokens: dict[str, int] = field(default_factory=dict)  # learned-model rewards: tokens forwarded
    # name -> samples not scored within reward.timeout_s (scored 0); empty without a time limit
    timeouts: dict[str, int] = field(default_factory=dict)


def _to_list(result: Any) -> list:
    if isinstance(result, torch.Tensor):
        return result.detach().float().cpu().reshape(-1).tolist()
    return list(result)


def _clean(values: list) -> tuple[list[float], int]:
    """Floats with non-numeric and non-finite values replaced by 0; returns (scores, how many)."""
    scores, failed = [], 0
    for value in values:
        try:
            score = float(value)
        except (TypeError, ValueError):
            score = math.nan
        if not math.isfinite(score):
            score, failed = 0.0, failed + 1
        scores.append(score)
    return scores, failed


def _check_options(name: str, fn: RewardFn, options: dict) -> None:
    """Fail at build time on options `fn` does not declare or rejects (dry call on an empty batch)."""
    params = inspect.signature(fn).parameters.values()
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    allowed = sorted(named - {"prompts", "completions"} - set(STANDARD_COLUMNS))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"reward.options.{name}: unknown option(s) {unknown}; valid: {allowed or 'none'}")
    try:
        fn([], [], **{column: [] for column in STANDARD_COLUMNS}, **options)
    except ConfigError:
        raise
    except TypeError as e:  # a required option is missing, or has a type the function cannot use
        raise ConfigError(f"reward.options.{name}: {e}") from None
    except Exception as e:  # a bug in the function, not in the config: the per-batch guard handles it
        log.warning("reward %r failed on an empty batch: %r", name, e)


class _CountsTokens(Protocol):
    """A learned-model reward (rewards.reward_model.RewardModelScorer): counts the tokens it scores."""

    forward_tokens: int  # real tokens forwarded so far
    num_params: int


class CombinedReward:
    """total = sum_name weight[name] * fn_name(prompts, completions, **columns, **options[name]).

    `weights`: reward name -> weight (0 computes and logs a component without training on it).
    `options`: reward name -> keyword arguments for that function; every name must have a weight.
    `extra`: callables known only at run time (the learned `reward_model`), same signature as the
    registered functions; they take precedence over registry entries of the same name and their
    options are not checked at build time.
    `timeout_s`: seconds each function may take on one batch (None: no limit, called in this thread).
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        options: Mapping[str, Mapping[str, Any] | None] | None = None,
        extra: Mapping[str, RewardFn] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        if timeout_s is not None and not timeout_s > 0:
            raise ConfigError(f"reward.timeout_s={timeout_s!r} must be a positive number of seconds, or null")
        self.timeout_s = timeout_s
        extra = dict(extra or {})
        available = {**REWARDS, **extra}
        valid = ", ".join(sorted(available))
        if not weights:
            raise ConfigError(f"reward.weights is empty; give a weight to at least one of: {valid}")
        unknown = sorted(set(weights) - set(available))
        if unknown:
            hints = "".join(f" ({n}: {_CALLER_SUPPLIED[n]})" for n in unknown if n in _CALLER_SUPPLIED)
            raise ConfigError(f"reward.weights: unknown reward(s) {unknown}; valid names: {valid}{hints}")
        given = {name: dict(opts or {}) for name, opts in (options or {}).items()}
        stray = sorted(set(given) - set(weights))
        if stray:
            raise ConfigError(
                f"reward.options: {stray} have no entry in reward.weights ({', '.join(weights)}); "
                "give them a weight (0 logs a reward without training on it)"
            )
        self.weights: dict[str, float] = {}
        for name, raw_weight in weights.items():
            try:
                weight = float(raw_weight)
            except (TypeError, ValueError):
                weight = math.nan
            if not math.isfinite(weight):
                raise ConfigError(f"reward.weights.{name}={weights[name]!r} must be a finite number")
            self.weights[name] = weight
        self.fns: dict[str, RewardFn] = {name: available[name] for name in weights}
        self.options: dict[str, dict] = {name: given.get(name, {}) for name in weights}
        for name, fn in self.fns.items():
            if name not in extra:
                _check_options(name, fn, self.options[name])
        self._warned: set[tuple[str, str]] = set()
        self._abandoned: dict[str, threading.Thread] = {}  # name -> its timed-out call, maybe still running

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict]) -> RewardOutput:
        """Score N completions; `rows[i]` is the data row of the prompt `completions[i]` answers.

        Every key of the rows becomes a per-sample column argument (missing keys -> None); a
        configured option of the same name overrides the column.
        """
        n = len(completions)
        if len(prompts) != n or len(rows) != n:
            raise ValueError(f"{len(prompts)} prompts and {len(rows)} rows for {n} completions")
        keys = dict.fromkeys(key for row in rows for key in row if key not in ("prompts", "completions"))
        columns = {key: [row.get(key) for row in rows] for key in keys}
        parts, failures, model_tokens, timeouts = {}, {}, {}, {}
        for name, fn in self.fns.items():
            tokens_before = getattr(fn, "forward_tokens", None)
            scores, failed, timed_out = self._score(name, fn, prompts, completions, columns) if n else ([], 0, 0)
            parts[name] = torch.tensor(scores, dtype=torch.float32).reshape(n)
            failures[name] = failed
            if self.timeout_s is not None:
                timeouts[name] = timed_out
            if tokens_before is not None:
                model_tokens[name] = cast(_CountsTokens, fn).forward_tokens - tokens_before
        total = torch.zeros(n, dtype=torch.float32)
        for name, weight in self.weights.items():
            total += weight * parts[name]
        return RewardOutput(total=total, parts=parts, failures=failures, model_tokens=model_tokens, timeouts=timeouts)

    def model_params(self) -> dict[str, int]:
        """Parameter counts of the learned-model rewards (those that count `forward_tokens`)."""
        counting = {name: cast(_CountsTokens, fn) for name, fn in self.fns.items() if hasattr(fn, "forward_tokens")}
        return {name: fn.num_params for name, fn in counting.items()}

    def _score(
        self, name: str, fn: RewardFn, prompts: list[str], completions: list[str], columns: dict
    ) -> tuple[list[float], int, int]:
        """Scores of one component for the batch, with its failed and timed-out sample counts."""
        n = len(completions)
        if self._still_running(name):  # its last timed-out call has not returned: not started again
            return [0.0] * n, 0, n
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        try:
            values = _to_list(call_before(deadline, fn, prompts, completions, **{**columns, **self.options[name]}))
        except RewardTimeout as timeout:
            self._abandon(name, timeout.thread)
            return [0.0] * n, 0, n
        except Exception as e:  # isolate the culprit(s): one bad sample must not zero the batch
            self._warn(name, f"raised {type(e).__name__}: {e}; scoring sample by sample")
            return self._score_each(name, fn, prompts, completions, columns, deadline)
        if len(values) != n:
            # No way to tell which score belongs to which sample, so none of them is trusted.
            self._warn(name, f"returned {len(values)} scores for {n} completions")
            return [0.0] * n, n, 0
        return (*_clean(values), 0)

    def _score_each(
        self, name: str, fn: RewardFn, prompts: list[str], completions: list[str], columns: dict, deadline: float | None
    ) -> tuple[list[float], int, int]:
        """Sample by sample, within what is left of the batch's deadline; the samples not scored by then
        are timeouts."""
        scores: list[float] = []
        failed = 0
        for i in range(len(completions)):
            sample = {key: [values[i]] for key, values in columns.items()}
            try:
                values = _to_list(
                    call_before(deadline, fn, [prompts[i]], [completions[i]], **{**sample, **self.options[name]})
                )
            except RewardTimeout as timeout:
                self._abandon(name, timeout.thread)
                left = len(completions) - i
                return scores + [0.0] * left, failed, left
            except Exception:
                values = []
            if len(values) != 1:
                values = [math.nan]
            score, bad = _clean(values)
            scores += score
            failed += bad
        return scores, failed, 0

    def _still_running(self, name: str) -> bool:
        thread = self._abandoned.get(name)
        if thread is not None and not thread.is_alive():
            del self._abandoned[name]  # it returned at last: the reward is called again from now on
            thread = None
        return thread is not None

    def _abandon(self, name: str, thread: threading.Thread | None) -> None:
        if thread is not None:
            self._abandoned[name] = thread
        self._warn(
            name,
            f"took longer than reward.timeout_s={self.timeout_s}s on a batch: its samples score 0 "
            f"(counted as reward/{name}_timeouts); the call is left running in a background thread "
            f"(a Python function cannot be stopped) and {name!r} is not called again until it returns",
            kind="timeout",
        )

    def _warn(self, name: str, message: str, kind: str = "failure") -> None:
        # Once per component and kind: the counts are logged every step, the explanation once.
        if (name, kind) not in self._warned:
            self._warned.add((name, kind))
            log.warning("reward %r %s", name, message)


def _plain(node: Any) -> dict:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node or {})


def build_reward(cfg: RewardConfig | DictConfig, extra: Mapping[str, RewardFn] | None = None) -> CombinedReward:
    """The `CombinedReward` described by a `reward` config (`RewardConfig` or its DictConfig)."""
    timeout_s = getattr(cfg, "timeout_s", None)  # a bare conf/reward/*.yaml, not merged onto RewardConfig, has none
    return CombinedReward(_plain(cfg.weights), _plain(cfg.options), extra=extra, timeout_s=timeout_s)
