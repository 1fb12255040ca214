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

.PHONY: setup demo test bench-smoke clean

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

# Kernel tests run the Triton kernels on the CPU through the interpreter.
test: $(STAMP) $(TRL_STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -n 2 --durations=15 tests

bench-smoke: $(STAMP)
	$(BIN)/python -m benchmarks.kernel_bench --smoke
	$(BIN)/python -m benchmarks.ppo_step --smoke
	$(BIN)/python -m benchmarks.capacity --smoke

clean:
	rm -rf $(VENV) benchmarks/.venv-trl runs .pytest_cache
