# `make train` and `make test` set everything up on a fresh machine (Python >= 3.10 with venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help setup train train-rae train-sit train-jit test test-fast lint format bench study clean

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

bench: setup  ## throughput / FLOP benchmarks -> benchmarks/results/
	$(BIN)/python -m benchmarks.run

study: setup  ## the small-scale registers study (diffusion and encoder side) on 2 CPU cores (~50 min) -> experiments/small_scale/
	$(BIN)/python -m benchmarks.small_scale

clean:
	rm -rf .pytest_cache .ruff_cache outputs multirun artifacts benchmarks/results
