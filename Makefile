# The two commands of the README. Both create or reuse .venv (tools/setup_env.sh is idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo_out
PYTEST_ARGS ?=

.PHONY: setup test demo bench-convert bench-pipeline bench-kernels bench-methods clean

setup:
	@bash tools/setup_env.sh

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(PY) tools/demo.py --out $(DEMO)

bench-convert: setup
	$(PY) -m pipeline.bench.convert

bench-pipeline: setup
	$(PY) -m pipeline.bench.views

bench-kernels: setup
	$(PY) -m kernels.bench

# Every registered method pretrained on the synthetic sets with one budget, kNN + linear probe vs random
# init: train/results/zoo.{csv,png}. ZOO_ARGS="--methods simclr,byol" picks methods (python -m train.zoo --help).
ZOO_ARGS ?=
bench-methods: setup
	$(PY) -m train.zoo $(ZOO_ARGS)

clean:
	rm -rf $(DEMO) .pytest_cache
