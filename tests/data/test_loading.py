"""Data loading: the shipped sample, bad-row skipping, splits, prompts and the prompt sampler."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conf.schema import ConfigError, DataConfig, load_choice
from data import PromptSampler, attach_prompts, load_examples, render_prompt, resolve_source

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "medical_o1_demo.jsonl"
CONFIGS = ("medical_o1_verifiable", "medical_o1", "medical_mcq")


def data_cfg(name: str, **overrides) -> DataConfig:
    """A shipped data config, read from local files (tests never touch the network)."""
    return dataclasses.replace(load_choice("data", name), **{"source": "local", **overrides})


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


def sample_rows() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------- the shipped sample


def test_sample_file_and_configs_ship():
    assert len(sample_rows()) == 158
    assert (ROOT / "data" / "DATA_LICENSE.md").is_file()
    for name in CONFIGS:
        assert data_cfg(name).name == name


@pytest.mark.parametrize("name", CONFIGS)
def test_sample_counts(name):
    train, evals, skipped = load_examples(data_cfg(name), ROOT)
    assert (len(train), len(evals), skipped) == (142, 16, {})


@pytest.mark.parametrize("name", CONFIGS)
def test_row_format(name):
    cfg = data_cfg(name)
    train, evals, _ = load_examples(cfg, ROOT)
    source = sample_rows()
    for row in train + evals:
        assert set(row) == {"id", "question", "answer", "reference", "cot", "options", "kind"}
        assert row["kind"] == cfg.kind and row["question"] and row["answer"]
        raw = source[int(row["id"])]  # the id is the row's index in the source file
        if cfg.kind == "mcq":
            assert row["answer"] == raw["answer_idx"] and row["answer"] in row["options"]
            assert row["question"].startswith(raw["question"].strip())
            assert "\nA. " in row["question"] and "\nD. " in row["question"]
            assert row["reference"] == raw["answer"].strip() and row["cot"] == ""
        elif cfg.kind == "sft":
            assert row["answer"] == row["reference"] == raw["Response"].strip()
            assert row["cot"] == raw["Complex_CoT"].strip() and row["options"] is None
        else:
            assert row["question"] == raw["Open-ended Verifiable Question"].strip()
            assert row["answer"] == raw["Ground-True Answer"].strip() and row["options"] is None


def test_mcq_options_without_gaps():
    # the sample mixes A-D and A-E rows; 4-option rows must not grow a null "E"
    train, evals, _ = load_examples(data_cfg("medical_mcq"), ROOT)
    sizes = sorted(len(r["options"]) for r in train + evals)
    assert sizes.count(4) == 140 and sizes.count(5) == 18
    assert all(isinstance(v, str) and v for r in train for v in r["options"].values())


# ---------------------------------------------------------------------------- splits


def test_split_deterministic_and_disjoint():
    cfg = data_cfg("medical_o1_verifiable")
    train_a, eval_a, _ = load_examples(cfg, ROOT)
    train_b, eval_b, _ = load_examples(cfg, ROOT)
    assert train_a == train_b and eval_a == eval_b
    train_ids, eval_ids = {r["id"] for r in train_a}, {r["id"] for r in eval_a}
    assert not train_ids & eval_ids and len(train_ids | eval_ids) == 158
    _, eval_c, _ = load_examples(data_cfg("medical_o1_verifiable", split_seed=7), ROOT)
    assert {r["id"] for r in eval_c} != eval_ids
    # the configs share a split seed, so the same source rows are held out in every form
    _, eval_mcq, _ = load_examples(data_cfg("medical_mcq"), ROOT)
    assert [r["id"] for r in eval_mcq] == [r["id"] for r in eval_a]


def test_max_rows_caps_train_only():
    full_train, full_eval, _ = load_examples(data_cfg("medical_o1"), ROOT)
    train, evals, _ = load_examples(data_cfg("medical_o1", max_rows=10), ROOT)
    assert train == full_train[:10] and evals == full_eval
    with pytest.raises(ValueError, match="max_rows"):
        load_examples(data_cfg("medical_o1", max_rows=0), ROOT)


def test_small_dataset_keeps_a_train_row(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"q": f"question {i}", "a": "yes"} for i in range(3)])
    cfg = dict(local_path="d.jsonl", question_field="q", answer_field="a", reference_field=None, cot_field=None)
    train, evals, _ = load_examples(data_cfg("medical_o1_verifiable", **cfg), tmp_path)
    assert (len(train), len(evals)) == (1, 2)
    train, evals, _ = load_examples(data_cfg("medical_o1_verifiable", eval_size=0, **cfg), tmp_path)
    assert (len(train), len(evals)) == (3, 0)


# ---------------------------------------------------------------------------- bad rows


def test_bad_open_rows_skipped_and_counted(tmp_path):
    write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"q": "What is it?", "a": "A cat", "r": "It is a cat.", "c": "Fur, whiskers."},
            {"q": "Optional fields absent?", "a": "Fine"},  # reference/cot are optional for kind=open
            {"a": "no question"},  # missing_field
            {"q": "null answer", "a": None},  # missing_field
            {"q": "   ", "a": "blank question"},  # empty_text
            {"q": "numeric answer", "a": 42},  # bad_type
            {"q": "blank answer", "a": "\n\t"},  # empty_text
        ],
    )
    cfg = data_cfg(
        "medical_o1_verifiable",
        local_path="d.jsonl",
        question_field="q",
        answer_field="a",
        reference_field="r",
        cot_field="c",
        eval_size=0,
    )
    train, _, skipped = load_examples(cfg, tmp_path)
    assert skipped == {"missing_field": 2, "empty_text": 2, "bad_type": 1}
    by_id = {r["id"]: r for r in train}
    assert set(by_id) == {"0", "1"}
    assert by_id["0"]["reference"] == "It is a cat." and by_id["0"]["cot"] == "Fur, whiskers."
    assert by_id["1"]["reference"] == "" and by_id["1"]["cot"] == ""


def test_bad_mcq_rows_skipped_and_counted(tmp_path):
    opts = {"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": None}  # null entries are dropped
    write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"question": "Which drug?", "options": opts, "answer_idx": "B"},
            {"question": "Lower-case letter?", "options": opts, "answer_idx": " c "},  # normalised to "C"
            {"question": "Letter not offered?", "options": opts, "answer_idx": "E"},  # bad_answer_letter
            {"question": "Null option is not offered?", "options": opts, "answer_idx": "D"},  # bad_answer_letter
            {"question": "Options as text?", "options": "A. x B. y", "answer_idx": "A"},  # bad_options
            {"question": "Empty option text?", "options": {"A": "", "B": "y"}, "answer_idx": "B"},  # bad_options
            {"question": "No options?", "answer_idx": "A"},  # missing_field
            {"question": "", "options": opts, "answer_idx": "A"},  # empty_text
        ],
    )
    cfg = data_cfg("medical_mcq", local_path="d.jsonl", reference_field=None, eval_size=0)
    train, _, skipped = load_examples(cfg, tmp_path)
    assert skipped == {"bad_answer_letter": 2, "bad_options": 2, "missing_field": 1, "empty_text": 1}
    rows = sorted(train, key=lambda r: r["id"])
    assert [(r["id"], r["answer"]) for r in rows] == [("0", "B"), ("1", "C")]
    assert rows[0]["options"] == {"A": "Aspirin", "B": "Heparin", "C": "Warfarin"}
    assert rows[0]["question"] == "Which drug?\n\nA. Aspirin\nB. Heparin\nC. Warfarin"
    assert rows[0]["reference"] == "Heparin"  # no reference field: the correct option's text


def test_bad_sft_rows_skipped_and_counted(tmp_path):
    write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"Question": "Q1", "Complex_CoT": "thinking", "Response": "answer"},
            {"Question": "Q2", "Complex_CoT": " ", "Response": "answer"},  # empty_text: SFT needs the CoT
            {"Question": "Q3", "Complex_CoT": "thinking"},  # missing_field: SFT needs the response
        ],
    )
    train, _, skipped = load_examples(data_cfg("medical_o1", local_path="d.jsonl"), tmp_path)
    assert skipped == {"empty_text": 1, "missing_field": 1}
    assert [(r["question"], r["cot"], r["answer"]) for r in train] == [("Q1", "thinking", "answer")]


def test_malformed_json_lines_counted(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"q": "ok?", "a": "yes"}, "{not json", [1, 2], {"q": "also ok?", "a": "no"}])
    cfg = data_cfg("medical_o1_verifiable", local_path="d.jsonl", question_field="q", answer_field="a", eval_size=0)
    train, _, skipped = load_examples(cfg, tmp_path)
    assert skipped == {"bad_json": 1, "missing_field": 1}
    assert sorted(r["id"] for r in train) == ["0", "3"]  # ids stay equal to line numbers


def test_no_valid_rows_is_a_clear_error(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"other": "x"}, {"Question": ""}])
    with pytest.raises(ValueError, match=r"no valid rows.*d\.jsonl.*missing_field"):
        load_examples(data_cfg("medical_o1", local_path="d.jsonl"), tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"no valid rows.*empty"):
        load_examples(data_cfg("medical_o1", local_path="empty.jsonl"), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"missing.jsonl"):
        load_examples(data_cfg("medical_o1", local_path="missing.jsonl"), tmp_path)


# ---------------------------------------------------------------------------- sources


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_auto_goes_local_when_offline(monkeypatch, var):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(var, "1")
    cfg = data_cfg("medical_o1_verifiable", source="auto")
    assert resolve_source(cfg) == "local"
    train, evals, _ = load_examples(cfg, ROOT)
    assert (len(train), len(evals)) == (142, 16)


def test_auto_without_hub_id_is_local():
    assert resolve_source(data_cfg("medical_o1", source="auto", hub_id=None)) == "local"


def test_hub_unreachable_is_one_clear_error():
    # offline mode is read when the hub libraries are imported, hence a fresh interpreter
    code = (
        "from pathlib import Path\n"
        "from conf.schema import DataConfig\n"
        "from data import load_examples\n"
        "try:\n"
        "    load_examples(DataConfig(source='hub', hub_id='FreedomIntelligence/medical-o1-verifiable-problem'),\n"
        "                  Path('.'))\n"
        "except RuntimeError as e:\n"
        "    assert e.__cause__ is None and e.__suppress_context__, 'hub errors should not be chained'\n"
        "    print('MESSAGE', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MESSAGE" in out.stdout and "data.source=local" in out.stdout and "unreachable" in out.stdout


# ---------------------------------------------------------------------------- prompts


def test_render_prompt_uses_chat_template(tokenizer):
    system = data_cfg("medical_o1_verifiable").system_prompt
    prompt = render_prompt(tokenizer, "What causes scurvy?", system)
    assert prompt.startswith(f"<|im_start|>system\n{system}<|im_end|>")
    assert "<|im_start|>user\nWhat causes scurvy?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert system not in render_prompt(tokenizer, "What causes scurvy?", "")


def test_render_prompt_without_chat_template(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert render_prompt(plain, "Q?", "Be brief.") == "System: Be brief.\n\nUser: Q?\n\nAssistant:"
    assert render_prompt(plain, "Q?", "") == "User: Q?\n\nAssistant:"


def test_prefill_follows_the_generation_prompt(tokenizer):
    prompt = render_prompt(tokenizer, "What causes scurvy?", "", prefill="<think>\n")
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    r1_distill = copy.deepcopy(tokenizer)  # a template whose generation prompt opens the block itself
    r1_distill.chat_template = "{% for m in messages %}<|User|>{{ m.content }}{% endfor %}<|Assistant|><think>\n"
    once = render_prompt(r1_distill, "Q?", "", prefill="<think>\n")
    assert once == render_prompt(r1_distill, "Q?", "") and once.count("<think>") == 1  # not repeated
    kept, _ = attach_prompts([{"id": "0", "question": "Q?"}], tokenizer, data_cfg("medical_o1", prefill="<think>\n"))
    assert kept[0]["prompt"].endswith("assistant\n<think>\n")
    typed = data_cfg("medical_o1", prefill="<think>\\n")  # data.prefill="<think>\n" as Hydra passes it on
    assert typed.prefill == "<think>\n"


DEMO = {"question": "Fever and a stiff neck?", "answer": "<think>\nMeninges.\n</think>\nMeningitis"}


def test_demonstrations_are_earlier_turns_of_the_conversation(tokenizer):
    prompt = render_prompt(tokenizer, "What causes scurvy?", "Be brief.", "<think>\n", [DEMO])
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nFever and a stiff neck?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nMeninges.\n</think>\nMeningitis<|im_end|>\n"
        "<|im_start|>user\nWhat causes scurvy?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    no_system = copy.deepcopy(tokenizer)  # a template that refuses a system turn: the instruction opens turn one
    no_system.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}{% endif %}"
        "[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"
    )
    merged = render_prompt(no_system, "Q?", "Be brief.", "", [DEMO])
    assert merged.startswith("[user] Be brief.\n\nFever and a stiff neck?\n[assistant] <think>")
    assert merged.endswith("[user] Q?\n[assistant]")
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert render_prompt(plain, "Q?", "", "", [DEMO]) == (
        "User: Fever and a stiff neck?\n\nAssistant: <think>\nMeninges.\n</think>\nMeningitis\n\nUser: Q?\n\nAssistant:"
    )
    cfg = data_cfg("medical_o1", demonstrations=[{"question": "A?", "answer": "<think>\\nB\\n</think>\\nC"}])
    assert cfg.demonstrations == [{"question": "A?", "answer": "<think>\nB\n</think>\nC"}]  # typed \n: a newline
    kept, _ = attach_prompts([{"id": "0", "question": "Q?"}], tokenizer, cfg)
    assert kept[0]["prompt"] == render_prompt(tokenizer, "Q?", cfg.system_prompt, "", cfg.demonstrations)
    for bad in ({"question": "A?"}, {"question": "A?", "answer": " "}, {"q": "A?", "answer": "B"}):
        with pytest.raises(ConfigError, match=r"data.demonstrations\[0\] .* needs a non-empty question and answer"):
            data_cfg("medical_o1", demonstrations=[bad])


def test_attach_prompts_skips_long_prompts(tokenizer):
    cfg = data_cfg("medical_o1_verifiable", max_prompt_tokens=120)
    rows = [
        {"id": "0", "question": "Short question?"},
        {"id": "1", "question": "word " * 200},
        {"id": "2", "question": "Another short one?"},
    ]
    kept, skipped = attach_prompts(rows, tokenizer, cfg)
    assert skipped == {"prompt_too_long": 1} and [r["id"] for r in kept] == ["0", "2"]
    assert kept[0]["prompt"] == render_prompt(tokenizer, "Short question?", cfg.system_prompt)
    assert "prompt" not in rows[0]  # the input rows are left untouched
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        attach_prompts(rows[1:2], tokenizer, cfg)
    assert attach_prompts([], tokenizer, cfg) == ([], {})


@pytest.mark.parametrize(
    "name, limit, too_long",
    [
        ("medical_o1_verifiable", None, 0),
        ("medical_o1", None, 0),
        ("medical_mcq", None, 0),
        ("medical_mcq", 384, 3),
    ],
)
def test_sample_prompt_lengths(tokenizer, name, limit, too_long):
    cfg = data_cfg(name) if limit is None else data_cfg(name, max_prompt_tokens=limit)
    train, evals, _ = load_examples(cfg, ROOT)
    kept, skipped = attach_prompts(train + evals, tokenizer, cfg)
    assert len(kept) == 158 - too_long and skipped == ({"prompt_too_long": too_long} if too_long else {})


# ---------------------------------------------------------------------------- prompt sampler


def test_sampler_epochs_and_determinism():
    rows = [{"id": str(i)} for i in range(10)]
    ids = lambda batch: [r["id"] for r in batch]  # noqa: E731
    a, b = PromptSampler(rows, 4, seed=3), PromptSampler(rows, 4, seed=3)
    draws = [ids(a.next_batch()) for _ in range(5)]
    assert draws == [ids(b.next_batch()) for _ in range(5)]
    flat = [i for batch in draws for i in batch]
    assert sorted(flat[:10]) == sorted(flat[10:20]) == [str(i) for i in range(10)]  # each epoch sees every row once
    assert flat[:10] != flat[10:20]  # reshuffled per epoch
    assert ids(PromptSampler(rows, 10, seed=4).next_batch()) != flat[:10]
    big = PromptSampler(rows[:3], 7, seed=0).next_batch()  # a batch larger than the data wraps over epochs
    assert len(big) == 7


def test_sampler_resume_is_exact():
    rows = [{"id": str(i)} for i in range(7)]
    ref = PromptSampler(rows, 3, seed=11)
    for _ in range(4):
        ref.next_batch()
    state = json.loads(json.dumps(ref.state_dict()))  # as stored in a checkpoint
    resumed = PromptSampler(rows, 3, seed=11)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(6)] == [ref.next_batch() for _ in range(6)]
    with pytest.raises(ValueError, match="data changed"):
        PromptSampler(rows[:5], 3, seed=11).load_state_dict(state)


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError):
        PromptSampler([], 2, seed=0)
    with pytest.raises(ValueError):
        PromptSampler([{"id": "0"}], 0, seed=0)
