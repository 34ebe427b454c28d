# tunelab: `make demo` trains the default model on the bundled data; `make test` runs the tests.
# Both first build .venv (once; again only when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines get the CPU build of torch (small, and cached on our machines); a machine with an
# NVIDIA GPU lets pip pick the CUDA build. Override with `make TORCH="torch==X" ...`.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH ?= $(if $(HAS_GPU),torch>=2.4,torch==2.13.0)
EXTRAS ?= $(if $(HAS_GPU),dev$(comma)sweep$(comma)serve$(comma)eval$(comma)qlora$(comma)liger,dev$(comma)sweep$(comma)serve$(comma)eval)
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
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

# The inner loop: everything but the tests marked `slow` (multi-epoch, multi-process, sweeps) and `gpu`.
test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow and not gpu"; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

lint: setup
	$(BIN)/ruff check src tests data bench

clean:
	rm -rf $(VENV) outputs multirun
