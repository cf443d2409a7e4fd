"""`python run.py <overrides> --help`: every option of the chosen groups with its value and its help, the internal
schema/* groups hidden; and unknown choices end in one line naming the valid ones."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from conf.checks import ConfigError
from conf.help import help_text, option_rows
from conf.options import option_help
from conf.schema import check_group_choices, compose_config

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_every_option_of_the_chosen_groups_with_value_and_help():
    text = help_text(["algo=ppo", "trainer.lr=3e-6"])
    cfg = compose_config(["algo=ppo", "trainer.lr=3e-6"])
    for group in ("algo", "model", "data", "reward", "trainer", "logger"):
        for row in option_rows(getattr(cfg, group), group):
            assert f"  {row.key} " in text, row.key
            assert row.help in text, row.key
    assert "algo.vf_coef" in text and "algo=ppo options:" in text
    assert "trainer.lr                      3e-06" in text or "3e-06" in text
    assert "schema" not in text  # the internal groups a YAML extends are not choices


def test_every_group_option_carries_the_help_of_its_field():
    cfg = compose_config([])
    rows = {row.key: row for row in option_rows(cfg.trainer, "trainer")}
    lr = next(f for f in dataclasses.fields(cfg.trainer) if f.name == "lr")
    assert rows["trainer.lr"].help == option_help(lr) != ""
    assert "trainer.lora.rank" in rows  # nested configs flattened


@pytest.mark.parametrize(
    "override, group",
    [("algo=grp", "algo"), ("model=nope", "model"), ("experiment=nope", "experiment"), ("+reward=nope", "reward")],
)
def test_unknown_choices_name_the_valid_ones(override, group):
    with pytest.raises(ConfigError) as err:
        check_group_choices([override])
    message = str(err.value)
    assert "\n" not in message and f"is not a choice of {group}; choose one of:" in message
    valid = sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
    assert ", ".join(valid) in message


def test_valid_choices_and_sweeps_pass():
    check_group_choices(["algo=ppo,grpo", "experiment=null", "model=tiny_llama", "trainer.lr=1e-5", "hydra/launcher=x"])
    with pytest.raises(ConfigError, match="algo=grpx"):
        check_group_choices(["algo=ppo,grpx"])


def test_run_py_help_and_unknown_choice_from_the_command_line():
    run = [sys.executable, str(ROOT / "run.py")]
    helped = subprocess.run(
        [*run, "algo=grpo", "--help"], check=False, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "algo.loss_type" in helped.stdout and "how per-token losses are aggregated" in helped.stdout
    bad = subprocess.run([*run, "algo=grp"], check=False, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: algo=grp is not a choice of algo; choose one of: eval, grpo, pipeline, ppo, reinforce_pp, "
        "rejection_sampling, reward_model, rloo, sft"
    ]
