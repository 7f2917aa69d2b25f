# graphquant developer targets. Every target works on a fresh clone: the venv is
# created on first use and each install step is recorded by a stamp file inside
# .venv, so re-runs skip straight to the command.

PYTHON        ?= python3.11
VENV          := .venv
VPY           := $(VENV)/bin/python
PIP           := $(VPY) -m pip
TORCH_VERSION := 2.13.0
THREADS       ?= 2
BENCH_ARGS    ?= --quiet-only 300 --write

.PHONY: test test-avx2 demo bench bench-quick lint install install-test install-demo install-bench clean-venv-stamps

test: install-test
	$(VPY) -m pytest -q -x -p no:cacheprovider tests

# The suite again under ONEDNN_MAX_CPU_ISA=AVX2: oneDNN's kernels without VNNI, which saturate
# (graphquant/kernels/x86.py), on a machine that has VNNI. Where this CPU saturates already, `make
# test` ran those paths, and this says so instead of running them twice.
test-avx2: install-test
	@if $(VPY) -c "import sys; from graphquant.kernels import x86; sys.exit(0 if x86.saturates() else 1)"; then \
	  echo "test-avx2: this CPU's int8 kernels saturate already; make test ran the AVX2 paths"; \
	else \
	  ONEDNN_MAX_CPU_ISA=AVX2 $(VPY) -m pytest -q -x -p no:cacheprovider tests; \
	fi

demo: install-demo
	$(VPY) examples/demo.py

# Thread pools pinned only here, so timings are comparable from run to run. The full run
# (every workload, 2 then 1 threads) takes about 47 min on 2 cores (Intel Xeon, 2026-12-06); bench-quick about 5 min.
bench: install-bench
	OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS) \
	  $(VPY) benchmarks/bench_peers.py --threads $(THREADS),1 $(BENCH_ARGS)

bench-quick: install-bench
	OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS) $(VPY) benchmarks/bench_peers.py --quick

lint: install-test
	$(VENV)/bin/ruff check graphquant
	$(VENV)/bin/mypy graphquant

install: install-test
install-test: $(VENV)/.stamp-test
install-demo: $(VENV)/.stamp-demo
install-bench: $(VENV)/.stamp-bench

# torch goes in first and alone, pinned: an unpinned resolve of `torch` may pull a
# multi-GB CUDA build, while torch==$(TORCH_VERSION) takes the CPU wheel.
$(VENV)/.stamp-torch:
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==$(TORCH_VERSION)
	touch $@

# torch==$(TORCH_VERSION) is repeated so no extra can move it.
$(VENV)/.stamp-%: pyproject.toml $(VENV)/.stamp-torch
	$(PIP) install -e '.[$*]' torch==$(TORCH_VERSION)
	touch $@

clean-venv-stamps:
	rm -f $(VENV)/.stamp-*
