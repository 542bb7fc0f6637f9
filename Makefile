# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
# While working: `make test-fast` (the unit tier, < 2 min on 2 cores) and `make lint`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= demo_out

.PHONY: venv sysdeps demo test test-fast lint bench clean

# System packages the suite and the demo use: a C++ toolchain for the exported model's client,
# a real SLURM, and iproute2 (`ip netns`) for its two-node form (tests/test_multinode.py).
# Installed only when running as root on an apt system and missing; elsewhere the tests that
# need them skip with the reason.
APT_PACKAGES := cmake g++ slurmctld slurmd slurm-client munge iproute2

# The constraints file pins the tested torch build (a local CPU wheel here); pyproject.toml
# stays permissive so cluster users keep their own CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,phantom]'
	touch $(STAMP)

venv: $(STAMP)

sysdeps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  missing=""; for p in $(APT_PACKAGES); do \
	    dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then echo "apt-get install$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends $$missing >/dev/null) \
	    || echo "warning: apt-get failed; what needs$$missing will skip"; fi; fi

# The main job on the embedded phantom (`mtcmkd demo`, about 10 min on 2 cores): synth ->
# preprocess -> MTCM-KD training with DeepSpeed on two CPU ranks -> evaluate (+ overlay PNGs)
# -> report -> TorchScript export -> the export on one case from Python and C++ -> a table.
demo: sysdeps $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/mtcmkd demo --out $(DEMO)

# pytest exits 5 when it collects no test; make treats that as a failure too.
test: sysdeps $(STAMP)
	$(BIN)/python -m pytest

# The fast unit tier: every test not marked `integration` (training subprocesses, the demo,
# SLURM, C++ builds, anything slower than ~2 s); needs no system package.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration"

# ruff, then the layer contract of pyproject.toml ([tool.importlinter]) on the installed layout.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python .ci/lint_imports.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_preprocess.py --raw ../shared/data/brats2021-sample

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
