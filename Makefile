# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= demo_out

.PHONY: venv demo test lint bench clean

# The constraints file pins the tested torch build (a local CPU wheel here); pyproject.toml
# stays permissive so cluster users keep their own CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,phantom]'
	touch $(STAMP)

venv: $(STAMP)

# The main job on the embedded phantom: synth -> preprocess -> store summary -> MTCM-KD
# training with DeepSpeed on two CPU ranks (torchrun).
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/mtcmkd synth $(DEMO)/raw --cases 8 --layout 2021 --shape 96 96 64 --seed 0
	$(BIN)/mtcmkd preprocess $(DEMO)/raw $(DEMO)/store --workers 2 --folds 4
	$(BIN)/mtcmkd store-info $(DEMO)/store
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node 2 -m mtcmkd train \
		--config configs/tiny.yaml --store $(DEMO)/store --out $(DEMO)/run

# pytest exits 5 when it collects no test; make treats that as a failure too.
test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_preprocess.py --raw ../shared/data/brats2021-sample

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
