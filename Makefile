# Two entry points for a fresh machine (2 cores, no GPU, nothing installed): `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
EXTRAS ?= dev
# CPU torch from the pinned release (an unpinned torch pulls gigabytes of CUDA packages).
TORCH_PIN ?= torch==2.13.0
DEMO_OUT ?= out/scout-tiny-fp32

.PHONY: setup demo test clean

$(BIN)/.installed-$(EXTRAS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_PIN)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $@

setup: $(BIN)/.installed-$(EXTRAS)

demo: setup
	$(BIN)/llama4-export inspect --model scout-tiny
	$(BIN)/llama4-export inspect --model scout

test: setup
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf $(VENV) out .pytest_cache
