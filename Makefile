# Two entry points for a fresh machine (2 cores, no GPU, nothing installed): `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# Test extras: dev (pytest + pytest-xdist, transformers as the oracle, onnxruntime-extensions), kernels (Triton's
# CPU interpreter), serve (FastAPI + uvicorn, the openai client the server tests drive it with) and ray (Ray Serve).
EXTRAS ?= dev,kernels,serve,ray
# CPU torch from the pinned release (an unpinned torch pulls gigabytes of CUDA packages).
TORCH_PIN ?= torch==2.13.0
PIP := $(BIN)/pip install --quiet --disable-pip-version-check
DEMO_OUT ?= out/scout-tiny
# pytest workers (pytest-xdist); one module per worker keeps each module's fixtures built once.
TEST_WORKERS ?= 2

.PHONY: demo test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH_PIN)"
	$(PIP) -e .
	touch $@

$(BIN)/.installed-$(EXTRAS): $(BIN)/.installed
	$(PIP) -e ".[$(EXTRAS)]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/llama4-export inspect --model scout
	$(BIN)/llama4-export --model scout-tiny --out $(DEMO_OUT)
	@echo "scout-tiny has seeded random weights, so its text is noise: the point is the pipeline. Try --checkpoint DIR."
	$(BIN)/llama4-run $(DEMO_OUT) --prompt "The history of" --max-new-tokens 32 --json

test: $(BIN)/.installed-$(EXTRAS)
	$(BIN)/python -m pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) out .pytest_cache
