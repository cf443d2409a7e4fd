"""experiments/compare.py: the table's numbers by hand on synthetic runs, the plots, and a real sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from experiments.compare import find_runs, label_runs, main, markdown_table, summary


def write_run(run_dir: Path, overrides: list[str], seed: int, rewards: list[float], **series: list[float]) -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed}))
    lines = [json.dumps({"step": 0, "eval/reward/total_mean": 0.0})]
    for i, reward in enumerate(rewards):
        row = {"step": i + 1, "reward/total_mean": reward, "tokens/generated_total": 10.0 * (i + 1),
               "time/total": 2.0 * (i + 1), "memory/peak_rss_mb": 100.0 + seed}
        row.update({key: values[i] for key, values in series.items()})
        lines.append(json.dumps(row))
    lines.append(json.dumps({"step": len(rewards), "eval/reward/total_mean": rewards[-1] / 2}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 99, "reward/tot')  # a torn last line


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    shared = ["model=tiny_llama", "hydra.run.dir=x"]
    write_run(tmp_path / "0", ["algo=grpo", "seed=0", *shared], 0, [0.0, 0.2, 0.4, 0.6], kl=[0.1, 0.1, 0.2, 0.3])
    write_run(tmp_path / "1", ["algo=grpo", "seed=1", *shared], 1, [0.2, 0.2, 0.4, 1.0], kl=[0.1, 0.1, 0.2, 0.5])
    write_run(tmp_path / "2", ["algo=ppo", "seed=0", *shared], 0, [0.1 * i for i in range(8)])  # longer, no KL
    return tmp_path


def test_table_numbers_by_hand(sweep):
    runs = find_runs([sweep])
    label_runs(runs)
    assert [r.label for r in runs] == ["algo=grpo", "algo=grpo", "algo=ppo"]
    rows = summary(runs)
    # grpo: final = last-quarter (1 step) means 0.6 and 1.0 -> 0.8 +- stdev 0.2828; mean rewards 0.3, 0.45
    assert rows["algo=grpo"]["final reward"] == pytest.approx((0.8, 0.28284), abs=1e-5)
    assert rows["algo=grpo"]["mean reward"] == pytest.approx((0.375, 0.10607), abs=1e-5)
    assert rows["algo=grpo"]["KL"] == pytest.approx((0.4, 0.14142), abs=1e-5)
    assert rows["algo=grpo"]["eval reward"] == pytest.approx((0.4, 0.14142), abs=1e-5)  # 0.3, 0.5
    assert rows["algo=grpo"]["peak RSS (MB)"] == pytest.approx((100.5, 0.70711), abs=1e-5)
    # ppo: one seed, 8 steps: last quarter = steps 7 and 8 = (0.6 + 0.7) / 2; no KL logged
    assert rows["algo=ppo"]["final reward"] == pytest.approx((0.65, None))
    assert rows["algo=ppo"]["steps"] == (8.0, None) and rows["algo=ppo"]["KL"] is None
    assert rows["algo=ppo"]["gen. tokens"] == (80.0, None) and rows["algo=ppo"]["time (s)"] == (16.0, None)
    table = markdown_table(runs).splitlines()
    assert table[2].startswith("| algo=grpo | 2 | 4 | 0.800 ± 0.283 | 0.375 ± 0.106 |")
    assert table[3].startswith("| algo=ppo | 1 | 8 | 0.650 | 0.350 |") and "| - |" in table[3]
    assert "TFLOPs" not in table[0]  # a column no run logged is left out


def test_report_writes_table_and_plots(sweep, tmp_path):
    report = main([str(sweep), "--out", str(tmp_path / "report"), "--title", "synthetic"])
    text = report.read_text()
    assert text.startswith("# synthetic") and "| algo=ppo | 1 |" in text
    for name in ("reward_vs_step", "reward_vs_tokens", "reward_vs_time", "kl"):
        png = tmp_path / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"({name}.png)" in text
    for key, name in (("entropy", "entropy"), ("completion/length_mean", "length")):  # no run logged them
        assert f"no run logged `{key}`" in text and not (tmp_path / "report" / f"{name}.png").exists()


def test_no_runs_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "no run with training metrics" in capsys.readouterr().err


@pytest.mark.slow
def test_ppo_vs_grpo_tiny_sweep_report(tmp_path):
    from tests.test_run import SHARED_TINY, run_py

    sweep = tmp_path / "sweep"
    proc = run_py(["-m", "experiment=ppo_vs_grpo", *SHARED_TINY, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = main([str(sweep)])
    text = report.read_text()
    for line in ("| algo=ppo | 2 | 2 |", "| algo=grpo | 2 | 2 |"):
        assert line in text, text
    assert (sweep / "report" / "reward_vs_tokens.png").exists()
