# Two entry points for a fresh machine (2 cores, no GPU, nothing installed): `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# Test extras: dev (pytest + pytest-xdist, transformers as the oracle), kernels (Triton's CPU interpreter), serve
# (FastAPI + uvicorn, the openai client the server tests drive it with) and ray (Ray Serve); the export extra (torch,
# onnx, ...) is in every venv made here: it is what `make demo` runs.
EXTRAS ?= dev,kernels,serve,ray
# CPU torch from the pinned release (an unpinned torch pulls gigabytes of CUDA packages).
TORCH_PIN ?= torch==2.13.0
PIP := $(BIN)/pip install --quiet --disable-pip-version-check
DEMO_OUT ?= out/scout-tiny
# A tiny multimodal checkpoint (random weights; the test fixture made by scripts/make_vision_fixtures.py).
DEMO_VISION_CHECKPOINT ?= tests/fixtures/vision/tiny-a
DEMO_VISION_OUT ?= out/vision-tiny
# pytest workers (pytest-xdist); one module per worker keeps each module's fixtures built once.
TEST_WORKERS ?= 2
# The C++ runtime (cpp/): its build directory, and the ONNX Runtime release layout it builds against (default: one
# assembled from registry packages into ~/.cache/llama4-export by cpp/provision_onnxruntime.sh).
CPP_BUILD ?= cpp/build
ONNXRUNTIME_ROOT ?=

.PHONY: demo test cpp clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH_PIN)"
	$(PIP) -e ".[export]"
	touch $@

$(BIN)/.installed-$(EXTRAS): $(BIN)/.installed
	$(PIP) -e ".[$(EXTRAS)]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/llama4-export inspect --model scout
	$(BIN)/llama4-export --model scout-tiny --out $(DEMO_OUT)
	@echo "scout-tiny has seeded random weights, so its text is noise: the point is the pipeline. Try --checkpoint DIR."
	$(BIN)/llama4-run $(DEMO_OUT) --prompt "The history of" --max-new-tokens 32 --json
	@echo "Images: a tiny multimodal checkpoint exported with its vision graph, then a generated picture as input."
	$(BIN)/llama4-export --checkpoint $(DEMO_VISION_CHECKPOINT) --out $(DEMO_VISION_OUT)
	$(BIN)/python examples/demo_picture.py out/demo-picture.png
	$(BIN)/llama4-run $(DEMO_VISION_OUT) --prompt "<|image|>What is in this picture?" --image out/demo-picture.png --max-new-tokens 16 --json

# g++, CMake, nlohmann-json, OpenSSL (SHA-256), patchelf and libpython3.11 (onnxruntime-extensions' library needs it) from Debian where
# missing, ONNX Runtime and the extensions library provisioned, then llama4rt and llama4-cpp.
cpp: $(BIN)/.installed
	@command -v g++ >/dev/null && command -v cmake >/dev/null && [ -f /usr/include/nlohmann/json.hpp ] && [ -f /usr/include/openssl/evp.h ] && command -v patchelf >/dev/null && ldconfig -p | grep -q libpython3.11.so.1.0 || \
		{ apt-get update -qq && apt-get install -y -qq g++ cmake nlohmann-json3-dev libssl-dev patchelf libpython3.11 >/dev/null; }
	cmake -S cpp -B $(CPP_BUILD) -DCMAKE_BUILD_TYPE=Release \
		-DONNXRUNTIME_ROOT="$$(if [ -n '$(ONNXRUNTIME_ROOT)' ]; then echo '$(ONNXRUNTIME_ROOT)'; else cpp/provision_onnxruntime.sh $(BIN)/python; fi)" >/dev/null
	cmake --build $(CPP_BUILD) -j2

test: $(BIN)/.installed-$(EXTRAS) cpp
	$(BIN)/python -m pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) out .pytest_cache $(CPP_BUILD) cpp/build-sanitize
