# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.aql-installed
# The CPU build of torch that lies on this kind of machine; never let pip resolve a bare `torch`.
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
PYTEST_ARGS ?=

.PHONY: run test native bench gpu-check clean peer-laplace

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "$(TRITON_SPEC)"
	AQL_SKIP_NATIVE=1 $(PY) -m pip install -q --no-build-isolation -e ".[dev,data]"
	touch $@

# Incremental CMake build of libaql_cpu.so (and libaql_cuda.so where nvcc exists) into aql_kernels/.
native: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

test: native
	TRITON_INTERPRET=1 $(PY) -m pytest $(PYTEST_ARGS)

run: native
	$(PY) -m aql demo

# The suites (make test never collects them: pytest's testpaths is tests/), their JSON under
# benchmarks/results/<machine>/, benchmarks/RESULTS.md and its plots. QUICK=1: the short form.
bench: native
	$(PY) -m benchmarks.run $(if $(QUICK),--quick) $(BENCH_ARGS)

.PHONY: bench-quick
bench-quick: native
	$(PY) -m benchmarks.run --quick $(BENCH_ARGS)

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build aql_kernels/*.so

# laplace-torch, Experiment 1's peer, in an environment of its own (it pulls torchvision and would pull
# another torch): results/experiments/uncertainty/laplace_torch_peer.json
PEER_VENV ?= .venv-peer
peer-laplace: native
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install -q "$(TORCH_SPEC)" laplace-torch pyyaml tqdm matplotlib mnist1d
	$(PEER_VENV)/bin/pip uninstall -y -q torchvision  # torchmetrics imports it only when present
	PYTHONPATH=. OMP_NUM_THREADS=1 $(PEER_VENV)/bin/python scripts/laplace_torch_peer.py --cost-rounds 7
