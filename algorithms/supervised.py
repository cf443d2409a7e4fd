"""The loop of the supervised stages (algo=reward_model, algo=sft): steps, LR schedule, eval cadence, logging.

The RL loop (algorithms.trainer.Trainer) samples a rollout every step; a supervised stage draws a
batch of rows instead, so it runs this smaller loop with the same trainer.* settings (max_steps,
eval_every, save_every, LR schedule) and writes the same metrics.jsonl / wandb records.
"""

from __future__ import annotations

from collections.abc import Callable

from tqdm.auto import tqdm

from algorithms.tracking import RunLogger
from algorithms.trainer import build_scheduler
from conf.schema import TrainerConfig


def supervised_fit(
    tcfg: TrainerConfig,
    optimizer,
    step_fn: Callable[[], dict[str, float]],
    evaluate: Callable[[], dict[str, float]],
    logger: RunLogger,
    desc: str,
    postfix: Callable[[dict[str, float]], dict[str, str]],
    save: Callable[[str, int], object] | None = None,
) -> dict[str, float]:
    """tcfg.max_steps calls of `step_fn` (one optimiser step each, returning its metrics).

    `evaluate()` runs before training (when eval_every > 0), every eval_every steps and after the last
    step; `save(name, step)` writes checkpoints/step_N every save_every steps and "final" at the end
    (when save_final). Returns the last step's metrics.
    """
    scheduler = build_scheduler(optimizer, tcfg)
    if tcfg.eval_every:
        logger.log(evaluate(), step=0)
    last: dict[str, float] = {}
    bar = tqdm(range(1, tcfg.max_steps + 1), desc=desc, dynamic_ncols=True)
    for step in bar:
        metrics = step_fn()
        scheduler.step()
        metrics["lr"] = scheduler.get_last_lr()[0]
        if step == tcfg.max_steps or (tcfg.eval_every and step % tcfg.eval_every == 0):
            metrics.update(evaluate())
        logger.log(metrics, step)
        bar.set_postfix(postfix(metrics))
        if save is not None and tcfg.save_every and step % tcfg.save_every == 0:
            save(f"step_{step}", step)
        last = metrics
    if save is not None and tcfg.save_final:
        save("final", tcfg.max_steps)
    return last
