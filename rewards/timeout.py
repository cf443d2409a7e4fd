"""A reward call bounded in time (`reward.timeout_s`): the function runs in a thread that the caller
waits for until a deadline.

Python cannot stop a running function, so a call past its deadline is abandoned, not killed: its thread
runs on in the background until the function returns (the result is then dropped) or the process exits
(the thread is a daemon, so it does not keep the process alive). CombinedReward does not call a reward
again while an abandoned call of it is still running: a hung function costs one thread, not one per
step, and never runs twice at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch


class RewardTimeout(Exception):
    """A reward call passed its deadline; `thread` is the abandoned call (None: it was never started)."""

    def __init__(self, thread: threading.Thread | None):
        super().__init__("reward call passed its deadline")
        self.thread = thread


def call_before(deadline: float | None, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs). With a deadline (a time.monotonic() value) it runs in a daemon thread, and
    RewardTimeout is raised if the deadline passes first; an exception of fn is raised here, in the caller."""
    if deadline is None:
        return fn(*args, **kwargs)
    if time.monotonic() >= deadline:
        raise RewardTimeout(None)
    outcome: dict[str, Any] = {}
    grad_enabled = torch.is_grad_enabled()  # grad mode is per thread: the call sees the caller's

    def run() -> None:
        try:
            with torch.set_grad_enabled(grad_enabled):
                outcome["value"] = fn(*args, **kwargs)
        except BaseException as err:  # handed over to the caller, which isolates failing rewards
            outcome["error"] = err

    thread = threading.Thread(target=run, name=f"reward-{getattr(fn, '__name__', 'call')}", daemon=True)
    thread.start()
    thread.join(max(deadline - time.monotonic(), 0.0))
    if thread.is_alive():
        raise RewardTimeout(thread)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
