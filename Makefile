# Refinery: `make serve` runs the embedded platform; `make test` runs the whole suite (needs Postgres and Redis on
# localhost, which .ci/run starts when they are not running).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1

.PHONY: serve test install lint bench bench-quick bench-gpu clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel (a local file on these machines) rather than a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	# numpy, scikit-learn and scipy at the versions the unlearning tests were measured on (constraints.txt).
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/refinery serve

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# The suite of side-by-side ratios (bench/results/summary.{json,md}); `make bench BENCH_ARGS=--quick` ≈ 5 minutes.
bench: $(STAMP)
	$(BIN)/python -m bench.run_all $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(BIN)/python -m bench.run_all --quick

bench-gpu: $(STAMP)
	$(BIN)/python -m bench.gpu $(BENCH_ARGS)

clean:
	rm -rf .refinery .pytest_cache
