# tunelab: `make demo` trains the default model on the bundled data; `make test` runs the tests.
# Both first build .venv (once; again only when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines get the CPU build of torch (small, and cached on our machines); a machine with an
# NVIDIA GPU lets pip pick the CUDA build and gets the CUDA-only extras (qlora, deepspeed). Override with
# `make TORCH="torch==X" ...` or `make EXTRAS=dev,sweep ...`. The ray extra (Hydra's Ray launcher,
# docs/SCALE.md) makes pip choose joblib 1.5.x: hydra-ray-launcher pins cloudpickle<3.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH ?= $(if $(HAS_GPU),torch>=2.4,torch==2.13.0)
EXTRAS ?= $(if $(HAS_GPU),dev$(comma)sweep$(comma)serve$(comma)eval$(comma)rag$(comma)harness$(comma)loggers$(comma)ray$(comma)qlora$(comma)deepspeed$(comma)liger,dev$(comma)sweep$(comma)serve$(comma)eval$(comma)rag$(comma)harness$(comma)loggers$(comma)ray)
comma := ,
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= $(if $(HAS_GPU),,-m "not gpu")  # the gpu-marked tests run where a GPU is

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(BIN)/tunelab train

# pytest exits 5 when it collects no test; that is not a failure of the code under test.
# The suite runs in TEST_JOBS processes (pytest-xdist), one test file per process at a time so a file's
# module fixtures are built once, each process with one torch thread so they never fight over the cores
# (measured on the 2-core machine: 11 min 3 s on 2 processes for 824 tests, 2026-12-06; with 676 tests, 3 processes
# took 9 min 25 s against 2 processes' 9 min 13 s, so 2 it stays).
# TEST_JOBS=0 runs it in this process. --no-loadscope-reorder: the files go out in tests/conftest.py's order (the
# longest first), not xdist's (the most tests first), so no long file starts last and runs alone at the end.
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
XDIST := $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder)
# SEED=N runs the files, and the tests within each, in a random order drawn from N (tests/conftest.py): `make test SEED=7`.
ORDER := $(if $(SEED),--shuffle-seed $(SEED))
test: setup
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(XDIST) $(ORDER) $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

# The inner loop: everything but the tests marked `slow` (multi-epoch, multi-process, sweeps) and `gpu`.
test-fast: setup
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(XDIST) $(ORDER) -m "not slow and not gpu"; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

lint: setup
	$(BIN)/ruff check src tests data bench

clean:
	rm -rf $(VENV) outputs multirun
