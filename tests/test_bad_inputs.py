"""Bad input never ends in a traceback: fuzzed config values give one `error:` line naming the key
(and the valid choices), fuzzed dataset rows are skipped and counted by reason, an all-bad dataset is
one clear error. Through `run_cli`, what `python run.py` runs after Hydra composes the config."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from algorithms.grpo import GRPOConfig
from algorithms.ppo import PPOConfig
from conf.schema import ConfigError, DataConfig, ModelConfig, TrainerConfig, check_override_keys, validate
from run import default_algo, load_data, run_cli

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model=tiny_llama", "logger.mode=disabled", "data.source=local", "trainer.max_steps=1"]


def config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[*BASE, *overrides])


def one_line_error(capsys, overrides: list[str], run_dir: Path) -> str:
    code, _ = run_cli(config(overrides), run_dir)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, (overrides, err[-2000:])
    return errors[0]


def with_value(base, key: str, value):
    """`base` with key=value, as a Hydra override sets it (keys absent from the YAML are added); the groups
    as plain containers, so that validate (not the composed schema) judges the value."""
    cfg = OmegaConf.create(OmegaConf.to_container(base, resolve=False))
    with open_dict(cfg):
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def typed_cases() -> list[tuple[str, str, object]]:
    """(group, key, value): every numeric and boolean option of every group, with a value of the wrong type."""
    cases = []
    for group, schema, algo in [
        ("trainer", TrainerConfig, "grpo"),
        ("algo", GRPOConfig, "grpo"),
        ("algo", PPOConfig, "ppo"),
        ("data", DataConfig, "grpo"),
        ("model", ModelConfig, "grpo"),
    ]:
        for f in dataclasses.fields(schema):
            if f.type in ("int", "float", "bool", "int | None", "float | None"):
                cases.append((algo, f"{group}.{f.name}", "zz9"))
    return cases


def test_fuzzed_config_values_are_one_line_errors_naming_the_key(tmp_path, capsys):
    bases = {"grpo": config([]), "ppo": config(["algo=ppo"])}
    cases = typed_cases()
    assert len(cases) > 40
    # values outside their choices or ranges
    choices = {
        "trainer.lr_schedule": "constant, linear, cosine",
        "trainer.device": "auto, cpu, cuda",
        "algo.loss_type": "grpo, bnpo, dr_grpo, dapo",
        "algo.surrogate": "clip, cispo, sapo",
        "algo.ratio_level": "token, sequence",
        "algo.rollout_correction": "none, tis, mis, seq_mis",
        "algo.scale_rewards": "group, batch, none",
        "data.source": "auto, hub, local",
        "data.kind": "open, mcq, sft",
        "model.source": "embedded, hub",
        "logger.mode": "offline, online, disabled",
        "algo.kl_estimator": "k1, k2, k3",
    }
    cases += [("grpo", key, "zz9") for key in choices] + [("ppo", "algo.kl_control", "zz9")]
    rng = random.Random(0)
    ranges = [
        "trainer.max_steps",
        "trainer.keep_last",
        "trainer.save_every",
        "trainer.eval_batch_size",
        "trainer.max_consecutive_skips",
        "trainer.warmup_steps",
        "algo.group_size",
        "algo.prompts_per_step",
        "algo.max_new_tokens",
        "algo.minibatch_size",
        "algo.temperature",
        "algo.beta",
        "data.eval_size",
    ]
    cases += [("grpo", key, rng.choice([-1, -3, -1000])) for key in ranges]
    cases += [("ppo", key, -0.5) for key in ("algo.gamma", "algo.lam", "algo.vf_coef", "algo.clip_high")]
    cases += [
        ("grpo", "trainer.adam_betas", [0.9]),
        ("grpo", "seed", "abc"),
        ("grpo", "algo.name", "nope"),
        ("grpo", "trainer.resume", str(tmp_path / "nowhere")),
    ]
    for algo, key, value in cases:
        code, _ = run_cli(with_value(bases[algo], key, value), tmp_path / "run")
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, (key, value, err[-2000:])
        assert key in errors[0] or (key == "algo.name" and "algo='nope'" in errors[0]), (key, errors[0])
        if key in choices:
            assert f"choose one of: {choices[key]}" in errors[0], errors[0]
    # through Hydra's own override parsing too
    line = one_line_error(capsys, ["+trainer.not_a_key=1"], tmp_path / "run")
    assert "trainer" in line and "valid keys" in line and "keep_last" in line


def test_misspelt_override_keys_list_the_valid_ones():
    # what run.py checks before Hydra, which rejects these without naming the keys that exist
    assert default_algo([]) == "grpo" and default_algo(["experiment=r1_pipeline"]) == "pipeline"
    with pytest.raises(ConfigError, match=r"trainer.lr_shedule is not an option of trainer; valid keys: .*lr_schedule"):
        check_override_keys(["trainer.lr_shedule=cosine"], "grpo")
    with pytest.raises(ConfigError, match=r"trainer.max_steps='ten': .*could not be converted to Integer"):
        check_override_keys(["trainer.max_steps=ten"], "grpo")
    with pytest.raises(ConfigError, match=r"algo.beta='x': .*Float"):
        check_override_keys(["-m", "algo.beta=0,0.1,x", "trainer.lora.target_modules=[q_proj,v_proj]"], "grpo")
    with pytest.raises(ConfigError, match=r"algo.scale_rewards is not an option of algo=ppo; .*group_size"):
        check_override_keys(["-m", "algo=ppo,grpo", "algo.scale_rewards=batch"], "grpo")
    check_override_keys(
        [
            "-m",
            "algo=ppo,grpo",
            "algo.beta=0",
            "+trainer.new=1",
            "reward.weights.format=2",
            "model=tiny_llama",
            "seed=0,1",
            "hydra.run.dir=x",
        ],
        "grpo",
    )


def bad_row(rng: random.Random, i: int) -> tuple[str, str | None]:
    """(a jsonl line, the reason it is skipped or None) for medical_o1_verifiable's two required fields."""
    q, a = "Open-ended Verifiable Question", "Ground-True Answer"
    good = {q: f"Which vitamin deficiency causes scurvy (case {i})?", a: "Vitamin C"}
    kind = rng.choice(
        ["good", "missing", "null", "empty", "blank", "number", "list", "dict", "too_long", "bad_json", "not_object"]
    )
    row = dict(good)
    field = rng.choice([q, a])
    if kind == "missing":
        del row[field]
    elif kind in ("null", "empty", "blank", "number", "list", "dict"):
        row[field] = {"null": None, "empty": "", "blank": " \n\t", "number": 7, "list": ["C"], "dict": {"x": 1}}[kind]
    elif kind == "too_long":
        row[q] = "symptom " * 400
    if kind == "bad_json":
        return json.dumps(row)[:-5], "bad_json"
    if kind == "not_object":
        return json.dumps([row]), "missing_field"
    reason = {
        "good": None,
        "missing": "missing_field",
        "null": "missing_field",
        "empty": "empty_text",
        "blank": "empty_text",
        "number": "bad_type",
        "list": "bad_type",
        "dict": "bad_type",
        "too_long": "prompt_too_long",
    }[kind]
    return json.dumps(row), reason


def test_fuzzed_rows_are_skipped_and_counted(tmp_path, tokenizer):
    rng = random.Random(1234)
    lines, expected = [], {}
    for i in range(300):
        line, reason = bad_row(rng, i)
        lines.append(line)
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    cfg = validate(
        config([f"data.local_path={tmp_path / 'rows.jsonl'}", "data.eval_size=0", "data.max_prompt_tokens=256"])
    )
    train, evals, skipped = load_data(cfg, tokenizer)
    assert skipped == expected
    assert len(train) == 300 - sum(expected.values()) and not evals
    assert all(row["question"].strip() and row["answer"] == "Vitamin C" for row in train)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "no valid rows for data=medical_o1_verifiable"),
        ('{"Open-ended Verifiable Question": ""}\n[1, 2]\n{"broken\n', "skipped: {"),
        (
            '{"Open-ended Verifiable Question": "' + "long " * 600 + '", "Ground-True Answer": "x"}\n',
            "exceed data.max_prompt_tokens=384",
        ),
    ],
)
def test_datasets_with_nothing_usable_are_one_line_errors(tmp_path, capsys, content, expected):
    (tmp_path / "rows.jsonl").write_text(content)
    line = one_line_error(capsys, [f"data.local_path={tmp_path / 'rows.jsonl'}"], tmp_path / "run")
    assert expected in line, line
    line = one_line_error(capsys, [f"data.local_path={tmp_path / 'missing.jsonl'}"], tmp_path / "run")
    assert "missing.jsonl does not exist" in line
