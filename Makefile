# `make train` and `make test` set everything up on a fresh machine (Python >= 3.10 with venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help setup train train-rae train-sit train-jit test test-fast lint format bench bench-gpu gpu-wheels study clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install dsr[dev] under constraints.txt (no-op when up to date)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

train: setup  ## the CPU quickstart: tiny pixel-space DiT with registers on synthetic shapes
	$(BIN)/python -m dsr.train experiment=quickstart

train-rae: setup  ## the quickstart in a tiny encoder's latents: statistics, stage-1 decoder, stage-2 DiT
	$(BIN)/python -m dsr.stats experiment=quickstart_rae
	$(BIN)/python -m dsr.train experiment=quickstart_rae_decoder
	$(BIN)/python -m dsr.train experiment=quickstart_rae

train-sit: setup  ## the quickstart in VAE latents with SiT: a small VAE (stage=vae), its statistics, a tiny SiT
	$(BIN)/python -m dsr.train experiment=quickstart_sit_vae
	$(BIN)/python -m dsr.stats experiment=quickstart_sit
	$(BIN)/python -m dsr.train experiment=quickstart_sit

train-jit: setup  ## the quickstart in pixel space with JiT: in-context class tokens and registers, JiT's recipe and sampler
	$(BIN)/python -m dsr.train experiment=quickstart_jit

test: setup  ## the test suite (CPU, a few minutes)
	$(BIN)/python -m pytest

test-fast: setup  ## the suite without the tests marked slow (the edit loop; under 3 minutes)
	$(BIN)/python -m pytest -m "not slow"

lint: setup  ## ruff check and format check (CI runs it before the tests)
	$(BIN)/ruff check dsr tests benchmarks
	$(BIN)/ruff format --check dsr tests benchmarks

format: setup  ## ruff format and the fixable lint
	$(BIN)/ruff format dsr tests benchmarks
	$(BIN)/ruff check --fix dsr tests benchmarks

bench: setup  ## throughput / FLOP benchmarks, and dsr's trainer and sampler against bare loops -> benchmarks/results/
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.overhead

# The GPU machine has torch, Lightning, timm and transformers but no package registry: what dsr needs beyond them
# travels as wheels for its Python 3.12 (`make gpu-wheels` here, then carry .whl/ along with the command).
GPU_WHEELS := hydra-core==1.3.8 omegaconf==2.3.1 torchdata==0.11.0 webdataset==1.0.2 braceexpand==0.1.7
GPU_PLATFORM := --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64

gpu-wheels: setup  ## download the wheels the GPU check needs into .whl/ (antlr4 has no wheel: built here)
	mkdir -p .whl
	$(BIN)/python -m pip download --quiet --no-deps $(GPU_PLATFORM) -d .whl $(GPU_WHEELS)
	$(BIN)/python -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3

bench-gpu:  ## the prepared GPU check (~4 min on one H100 / H200) -> benchmarks/results/<gpu>.json; runs with python3
	if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
		--target /tmp/dsr-site .whl/*.whl; fi
	PYTHONPATH=/tmp/dsr-site:$(CURDIR) python3 -m benchmarks.gpu

study: setup  ## the small-scale registers study (diffusion and encoder side) on 2 CPU cores (~50 min) -> experiments/small_scale/
	$(BIN)/python -m benchmarks.small_scale

clean:
	rm -rf .pytest_cache .ruff_cache outputs multirun artifacts benchmarks/results
