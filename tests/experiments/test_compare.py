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
        row = {
            "step": i + 1,
            "reward/total_mean": reward,
            "tokens/generated_total": 10.0 * (i + 1),
            "time/total": 2.0 * (i + 1),
            "memory/peak_rss_mb": 100.0 + seed,
        }
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


def test_intervals_and_welch_against_scipy():
    from scipy import stats as sp

    from experiments.stats import mean_ci, t_quantile, welch

    assert t_quantile(0.975, 4) == pytest.approx(2.7764451)
    ci = mean_ci([1.0, 2.0, 3.0, 6.0])  # mean 3, s = sqrt(14/3), t(0.975, 3) = 3.182446
    half = 3.182446 * (14 / 3) ** 0.5 / 2
    assert (ci.mean, ci.low, ci.high, ci.n) == pytest.approx((3.0, 3.0 - half, 3.0 + half, 4))
    assert mean_ci([0.5]).low is None  # one seed: no interval
    a, b = [0.9, 1.1, 1.3, 0.8, 1.0], [0.2, 0.5, 0.1]
    d = welch(a, b)
    reference = sp.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((reference.low, reference.high)) and d.detected
    assert welch([1.0], b).low is None


def test_curves_at_equal_tokens_by_hand():
    from experiments.stats import mean_over, value_at

    xs, ys = [10.0, 20.0, 40.0], [0.0, 1.0, 0.0]
    assert value_at(xs, ys, 15) == 0.5 and value_at(xs, ys, 30) == 0.5 and value_at(xs, ys, 5) == 0.0
    assert value_at(xs, ys, 50) == 0.0
    # area from 10 to 40: triangle of height 1 over 30 tokens = 15 -> mean 0.5; from 15 to 20: (0.5 + 1) / 2
    assert mean_over(xs, ys, 10, 40) == pytest.approx(0.5) and mean_over(xs, ys, 15, 20) == pytest.approx(0.75)
    assert mean_over(xs, ys, 20, 20) == 1.0


@pytest.fixture()
def three_methods(tmp_path: Path) -> Path:
    """grpo and rloo share a curve (up to seed noise); ppo sits 0.5 below them: 4 seeds each. ppo's runs
    generate more tokens per step, so the methods meet at equal tokens only on grpo's budget."""
    noise = [0.01, -0.02, 0.015, -0.005]
    for seed, e in enumerate(noise):
        curve = [0.5 + 0.1 * i + e for i in range(4)]
        write_run(tmp_path / f"g{seed}", ["algo=grpo", f"seed={seed}"], seed, curve)
        same = [v - e + noise[::-1][seed] for v in curve]  # the same seed noise, in another order
        write_run(tmp_path / f"r{seed}", ["algo=rloo", f"seed={seed}"], seed, same)
        lower = [0.05 * (i - 1) + e for i in range(8)]  # half the tokens per step: 0.1 per 10 tokens, 0.5 lower
        write_run(
            tmp_path / f"p{seed}",
            ["algo=ppo", f"seed={seed}"],
            seed,
            lower,
            **{"tokens/generated_total": [5.0 * (i + 1) for i in range(8)]},
        )
    return tmp_path


def test_a_large_difference_is_detected_and_an_equal_pair_is_not(three_methods):
    from experiments.compare import conclusions

    runs = find_runs([three_methods])
    label_runs(runs)
    text = "\n".join(conclusions(runs))
    # ppo's tokens/generated_total is 5 per step: it reaches 40 tokens, the others 40 too
    assert "reward at 40 tokens: algo=grpo above algo=ppo (+0.5" in text
    assert "reward at 40 tokens: algo=rloo above algo=ppo (+0.5" in text
    assert "reward at 40 tokens: algo=grpo vs algo=rloo: no difference detected with 4 vs 4 seeds" in text
    assert "(AUC): algo=grpo vs algo=rloo: no difference detected" in text
    assert "| algo=ppo | 4 |" in text  # the interval table
    assert "## Factors" not in text  # one swept option: the pairs say it all


def test_factor_table_names_what_each_factor_moves(tmp_path):
    from experiments.compare import conclusions

    for seed in range(3):  # baseline moves the reward by 0.4; kl_in moves nothing but noise
        for baseline, level in (("critic", 0.0), ("group_mean", 0.4)):
            for kl_in, e in (("reward", 0.01), ("loss", -0.01)):
                rewards = [level + 0.02 * seed + e] * 4
                write_run(
                    tmp_path / f"{baseline}_{kl_in}_{seed}",
                    [f"algo.baseline={baseline}", f"algo.kl_in={kl_in}", f"seed={seed}"],
                    seed,
                    rewards,
                    kl=[0.1 + 0.01 * seed] * 4,
                )
    runs = find_runs([tmp_path])
    label_runs(runs)
    assert len({r.label for r in runs}) == 4  # one row per combination
    text = "\n".join(conclusions(runs))
    assert "- `algo.baseline` moves final reward (group_mean - critic: +0.400" in text
    assert "- `algo.kl_in`: no effect detected on any metric with at least 6 runs per level" in text
    assert "| algo.kl_in | KL |" in text


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


@pytest.mark.slow
def test_ppo_grpo_factors_tiny_sweep_has_a_row_per_combination(tmp_path):
    from tests.test_run import TINY, run_py

    sweep = tmp_path / "sweep"
    fast = ["logger.mode=disabled", "trainer.save_final=false", "trainer.log_samples=0"]
    proc = run_py(["-m", "experiment=ppo_grpo_factors", *TINY, *fast, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = main([str(sweep)]).read_text()
    table = text.split("\n\n")[1]
    combos = [
        f"| algo.baseline={b} algo.kl_in={k} | 1 | 2 |"
        for b in ("critic", "group_mean", "leave_one_out")
        for k in ("reward", "loss")
    ]
    assert sum(line.startswith("| algo.") for line in table.splitlines()) == 6 and all(c in table for c in combos)
    assert "## Factors" in text and "| algo.baseline | s/step |" in text and "| algo.kl_in | KL |" in text
    for run_dir in sweep.iterdir():  # a group baseline runs no critic; the critic one does
        if (run_dir / "metrics.jsonl").exists():
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            critic_tokens = [r["compute/critic_forward_tokens_total"] for r in rows if "compute/flops" in r][-1]
            assert (critic_tokens > 0) == ("_critic_" in run_dir.name), run_dir.name


def test_output_only_and_ignored_overrides_do_not_split_a_method(tmp_path):
    curve = [0.1, 0.2, 0.3, 0.4]
    write_run(tmp_path / "a0", ["algo=grpo", "seed=0"], 0, curve)
    write_run(tmp_path / "a1", ["algo=grpo", "seed=1", "trainer.save_final=false", "logger.mode=disabled"], 1, curve)
    write_run(tmp_path / "a2", ["algo=grpo", "seed=2", "trainer.threads=1"], 2, curve)
    write_run(tmp_path / "b0", ["algo=ppo", "seed=0", "trainer.save_final=false"], 0, curve)
    runs = find_runs([tmp_path])
    label_runs(runs, ignore=("trainer.save_final", "logger.", "trainer.threads"))
    assert sorted({r.label for r in runs}) == ["algo=grpo", "algo=ppo"]
    label_runs(runs)  # the default ignores only what changes the output, not trainer.threads
    assert "algo=grpo trainer.threads=1" in {r.label for r in runs}
    assert len({r.label for r in runs if r.label.startswith("algo=grpo")}) == 2


# ---- time to a held-out threshold, censored ------------------------------------------------------------


def test_logrank_against_scipy_and_by_permutation():
    from scipy.stats import CensoredData, logrank

    from experiments.stats import Survival, km_median, logrank_test, logrank_z

    a = Survival([2, 4, 4, 6, 9], [True, True, False, True, False])
    b = Survival([3, 5, 7, 8, 10], [True, False, True, True, False])

    def censored(s):
        return CensoredData(
            uncensored=[t for t, r in zip(s.times, s.reached) if r],
            right=[t for t, r in zip(s.times, s.reached) if not r],
        )

    assert logrank_z(a, b) == pytest.approx(float(logrank(censored(a), censored(b)).statistic))
    # separated groups of 3, every run reaching: 2 of the C(6, 3) = 20 labellings are as extreme
    fast, slow = Survival([1, 2, 3], [True] * 3), Survival([4, 5, 6], [True] * 3)
    z, p = logrank_test(fast, slow)
    assert z > 0 and p == pytest.approx(2 / 20)
    assert logrank_test(Survival([5], [False]), Survival([5], [False])) is None  # no event: nothing to test
    # Kaplan-Meier median: 4 runs, events at 1 and 3 and a censoring at 2: S(1) = 3/4, S(3) = 3/4 * 1/2
    assert km_median(Survival([1, 2, 3, 9], [True, False, True, False])) == 3
    assert km_median(Survival([1, 5, 5], [True, False, False])) is None  # 2 of 3 never reached it


def test_time_to_reach_is_censored_and_reported(tmp_path):
    """Two methods whose held-out rate crosses 0.5 early (all seeds) and never: the censored ones are
    'not reached', and the log-rank verdict names the faster method."""
    for i in range(4):
        fast = [0.2, 0.6, 0.8] if i < 3 else [0.1, 0.4, 0.55]
        write_run(
            tmp_path / f"fast{i}", ["algo=grpo", f"seed={i}"], i, [0.1, 0.2, 0.3], **{"eval/format_strict_rate": fast}
        )
        write_run(
            tmp_path / f"slow{i}",
            ["algo=ppo", f"seed={i}"],
            i,
            [0.1, 0.2, 0.3],
            **{"eval/format_strict_rate": [0.0, 0.1, 0.2]},
        )
    runs = find_runs([tmp_path])
    label_runs(runs)
    from experiments.verdicts import time_to_reach

    by_path = {r.path.name: r for r in runs}
    assert time_to_reach(by_path["fast0"], "eval/format_strict_rate", 0.5) == (20.0, True)  # step 2, 20 tokens
    assert time_to_reach(by_path["fast3"], "eval/format_strict_rate", 0.5) == (30.0, True)
    assert time_to_reach(by_path["slow0"], "eval/format_strict_rate", 0.5) == (30.0, False)  # censored
    report = main([str(tmp_path), "--out", str(tmp_path / "report")]).read_text()
    assert "| algo=grpo | 4 | 4 of 4 | 20 | 2 |" in report
    assert "| algo=ppo | 4 | 0 of 4 | not reached (> 30) | not reached (> 3) |" in report
    assert "- algo=grpo reaches it sooner than algo=ppo (log-rank" in report
    assert "final format_strict_rate" in report and "format_strict_rate AUC over 0-30 tokens" in report
    assert (tmp_path / "report" / "format_strict_vs_tokens.png").exists()
    quiet = main([str(tmp_path), "--out", str(tmp_path / "r2"), "--reach", "none"]).read_text()
    assert "Time to reach" not in quiet
