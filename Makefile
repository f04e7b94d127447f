# `make demo`: set up .venv, then init -> prepare -> train -> merge -> generate on CPU in a few minutes.
# `make test`: set up .venv, then run the test suite (CPU only; GPU tests skip without CUDA).
VENV ?= .venv
# The CPU build of torch. This workplace's pip finds it on disk; elsewhere add its index, e.g.
#   make demo TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fla-cpu lint format bench clean

venv: $(STAMP)

# torch first, pinned to the CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[dev,quant,plot]"
	touch $(STAMP)

demo: venv
	$(VENV)/bin/rwkv-disha demo --out demo_out

test: venv
	$(VENV)/bin/python -m pytest

# fla's Triton kernels on this CPU through Triton's interpreter, against our loops (~1 GB side venv: Triton).
FLA_VENV ?= .venv-fla
test-fla-cpu:
	test -x $(FLA_VENV)/bin/python || python3 -m venv $(FLA_VENV)
	$(FLA_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(FLA_VENV)/bin/python -m pip install -q -e . pytest numpy packaging einops triton==3.9.0 fla-core==0.6.0
	$(FLA_VENV)/bin/python -m pytest -p no:cacheprovider tests/kernels/test_fla_interpreted.py

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf demo_out .pytest_cache
