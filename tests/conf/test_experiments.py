"""The experiment presets compose, validate, sweep what they say, and hold the budget they promise."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conf.schema import ConfigError, validate

CONF = str(Path(__file__).resolve().parents[2] / "conf")
PRESETS = {
    "ppo_vs_grpo": {"algo": "ppo,grpo", "seed": "0,1"},
    "grpo_group_size": {"algo.group_size": "2,4,8"},
    "kl_ablation": {"algo.beta": "0,0.04,0.1", "algo.kl_estimator": "k1,k3"},
    "loss_type": {"algo.loss_type": "grpo,dr_grpo,dapo"},
    "surrogate": {"algo.surrogate": "clip,cispo,sapo", "algo.ratio_level": "token,sequence"},
    "clip_higher": {"algo.clip_high": "0.2,0.28"},
    "ppo_grpo_factors": {"algo.baseline": "critic,group_mean,leave_one_out", "algo.kl_in": "reward,loss"},
    "mcq_compare": {"algo": "ppo,grpo,rloo,reinforce_pp", "seed": "0,1,2"},
}


def composed(overrides: list[str], hydra: bool = False):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra)


def sequences_per_step(algo) -> int:
    return algo.prompts_per_step * algo.group_size


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_sweeps_what_it_says(name):
    cfg = composed([f"experiment={name}"], hydra=True)
    assert dict(cfg.hydra.sweeper.params) == PRESETS[name]
    assert cfg.experiment_name == name  # the wandb group
    assert f"multirun/{name}/" in cfg.hydra.sweep.dir


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_point_of_the_sweep_validates(name):
    import itertools

    params = {k: v for k, v in PRESETS[name].items() if k != "seed"}  # a seed cannot break validation
    for values in itertools.product(*(v.split(",") for v in params.values())):
        overrides = [f"experiment={name}", *(f"{k}={v}" for k, v in zip(params, values))]
        validate(composed(overrides))


def test_ppo_vs_grpo_spends_the_same_generation_budget():
    ppo = validate(composed(["experiment=ppo_vs_grpo", "algo=ppo"]))
    grpo = validate(composed(["experiment=ppo_vs_grpo", "algo=grpo"]))
    assert sequences_per_step(ppo.algo) == sequences_per_step(grpo.algo) == 8
    assert ppo.algo.max_new_tokens == grpo.algo.max_new_tokens
    assert ppo.trainer.max_steps == grpo.trainer.max_steps == 28
    assert ppo.algo.group_size == 1  # PPO: P x G distinct prompts, one sample each
    assert (ppo.model, ppo.data, ppo.reward, ppo.trainer) == (grpo.model, grpo.data, grpo.reward, grpo.trainer)


@pytest.mark.parametrize("group_size, prompts", [(2, 4), (4, 2), (8, 1)])
def test_group_size_sweep_holds_the_budget(group_size, prompts):
    cfg = validate(composed(["experiment=grpo_group_size", f"algo.group_size={group_size}"]))
    assert (cfg.algo.prompts_per_step, sequences_per_step(cfg.algo)) == (prompts, 8)


def test_group_size_that_does_not_divide_the_budget_is_a_clear_error():
    with pytest.raises(ConfigError, match="choose a divisor of 8"):
        validate(composed(["experiment=grpo_group_size", "algo.group_size=3"]))


def test_estimators_sweep_compares_four_estimators_at_one_budget():
    cfg = composed(["experiment=estimators"], hydra=True)
    assert dict(cfg.hydra.sweeper.params) == {"algo": "ppo,grpo,rloo,reinforce_pp", "seed": "0,1"}
    assert cfg.experiment_name == "estimators" and "multirun/estimators/" in cfg.hydra.sweep.dir
    runs = {
        algo: validate(composed(["experiment=estimators", f"algo={algo}"]))
        for algo in ("ppo", "grpo", "rloo", "reinforce_pp")
    }
    assert {algo: sequences_per_step(c.algo) for algo, c in runs.items()} == dict.fromkeys(runs, 8)
    assert {c.algo.max_new_tokens for c in runs.values()} == {40}
    assert {c.trainer.max_steps for c in runs.values()} == {28}
    assert runs["rloo"].algo.group_size >= 2  # a leave-one-out baseline needs two samples per prompt
    first = runs["ppo"]
    for c in runs.values():  # only the algorithm differs
        assert (c.model, c.data, c.reward, c.trainer, c.experiment_name) == (
            first.model,
            first.data,
            first.reward,
            first.trainer,
            "estimators",
        )


def test_ppo_grpo_factors_is_one_grid_at_one_budget():
    corners = [
        validate(composed(["experiment=ppo_grpo_factors", f"algo.baseline={b}", f"algo.kl_in={k}"]))
        for b, k in (("critic", "reward"), ("group_mean", "loss"))
    ]  # PPO's corner and GRPO's
    assert {(c.algo.name, sequences_per_step(c.algo), c.algo.group_size) for c in corners} == {("ppo", 8, 4)}
    assert [(c.algo.baseline, c.algo.kl_in) for c in corners] == [("critic", "reward"), ("group_mean", "loss")]


def test_mcq_compare_holds_out_40_questions_and_one_budget():
    from data.loading import load_examples

    runs = {
        algo: validate(composed(["experiment=mcq_compare", f"algo={algo}"]))
        for algo in ("ppo", "grpo", "rloo", "reinforce_pp")
    }
    assert {(sequences_per_step(c.algo), c.algo.prompts_per_step, c.algo.max_new_tokens) for c in runs.values()} == {
        (8, 2, 12)
    }
    first = runs["ppo"]
    assert (first.data.name, first.data.kind, first.reward.name) == ("medical_mcq", "mcq", "format_accuracy")
    assert "letter" in first.data.system_prompt
    for c in runs.values():
        assert (c.model, c.data, c.reward, c.trainer) == (first.model, first.data, first.reward, first.trainer)
    _, held_out, skipped = load_examples(first.data, Path(CONF).parent)
    assert len(held_out) >= 40 and all(r["kind"] == "mcq" and r["options"] for r in held_out) and not skipped
