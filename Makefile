# Two entry points on a fresh machine (python3, pip, make):
#   make run    set up, pull the default model, serve it (OpenAI API on 127.0.0.1:8000)
#   make test   set up, pull the default model, run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup model run test test-unit lint clean peers gpu-wheels

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch first, pinned to the CPU build on this machine's disk, so that the
# project's torch>=... is already met and pip never pulls a CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	touch $@

setup: $(VENV)/.installed

model: setup
	$(BIN)/ferrolm pull smollm2-135m

run: model
	$(BIN)/ferrolm serve $(ARGS)

# Every test, unit and integration, with the 15 slowest listed at the end.
test: model
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests -m "" --durations=15

# The fast unit tests only (tiny random model; no model download needed).
test-unit: setup
	$(BIN)/python -m pytest tests --durations=10

# The peers of `ferrolm bench --baseline llama.cpp`: llama-cpp-python built for this CPU.
peers: setup
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/pip install -e '.[llamacpp]'

# Wheels of the project's small pure dependencies for bench/gpu_check.sh on a GPU machine
# that has torch and triton but no network (Python 3.10-3.13; pydantic-core and PyYAML
# are built per version), at this venv's versions.
GPU_WHEELS := pydantic pydantic-core annotated-types typing-inspection typing-extensions gguf pyyaml tqdm tomli-w click
gpu-wheels: setup
	rm -rf .whl
	for v in 3.10 3.11 3.12 3.13; do \
		$(BIN)/pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
			--platform manylinux_2_17_x86_64 --python-version $$v -d .whl \
			$$($(BIN)/python -c "import importlib.metadata as m; print(*(f'{n}=={m.version(n)}' for n in '$(GPU_WHEELS)'.split()))") \
			|| exit 1; \
	done

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
