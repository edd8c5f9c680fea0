# Everything a new machine needs is installed here, into .venv in the repo.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# torch is pinned to the CPU build that lies on this machine's disk; any other
# version or range pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0
DATA   ?= ../shared/data

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev,fast,nn,bench,cluster]'
	touch $(STAMP)

# the code's own checks (ruff: pyflakes, isort, pyupgrade, one line length; mypy), then the tests
test: setup
	$(BIN)/ruff check engine tests bench examples
	$(BIN)/mypy
	$(BIN)/python -m pytest -q tests

# torch's OpenMP threads sleep rather than spin while they wait, so the demo shares a busy
# machine gracefully (engine/runtime.py); OpenMP reads this only as the process starts.
# A policy already in the environment is kept.
TORCH_ENV := OMP_WAIT_POLICY=$(or $(OMP_WAIT_POLICY),PASSIVE)

demo: setup
	$(TORCH_ENV) $(BIN)/python examples/demo.py --data $(DATA)

# The full benchmarks, the recipe ablation, the learner over both sets and seeds, and the crash soaks
# (about three and a half hours on 2 cores): JSON and PNG into runs/bench/.
bench: setup
	$(BIN)/python bench/scale.py --out runs/bench
	$(BIN)/python bench/compaction.py --out runs/bench --data $(DATA)
	$(BIN)/python bench/calibration.py --out runs/bench
	$(BIN)/python bench/shards.py --out runs/bench
	$(TORCH_ENV) $(BIN)/python bench/recipes.py --out runs/bench --data $(DATA)
	$(TORCH_ENV) $(BIN)/python bench/learner.py --out runs/bench --data $(DATA)
	$(BIN)/python bench/torch_runtime.py --out runs/bench
	$(BIN)/python bench/flight_transport.py --out runs/bench
	$(BIN)/python bench/tail.py --out runs/bench --data $(DATA)
	$(BIN)/python bench/temperature.py --out runs/bench --data $(DATA)
	$(BIN)/python -m pytest -q bench --benchmark-json=runs/bench/pytest-benchmark.json
	$(BIN)/python -m tests.store.crasher soak runs/bench/soak --minutes 20 > runs/bench/soak.json
	$(BIN)/python -m tests.tail.test_certificate 3000 > runs/bench/certificate.json
	$(BIN)/python -m tests.cluster.sharded_crasher soak runs/bench/sharded-soak --minutes 10 > runs/bench/sharded-soak.json

clean:
	rm -rf $(VENV) runs .pytest_cache
