# `make demo` and `make test` do all set-up themselves (see scripts/env.sh).
SHELL := /bin/bash

.PHONY: demo test bench env

## demo: build the emoji benchmark (npm) and evaluate the pretrained backbone zero-shot on its test split
demo:
	@venv=$$(scripts/env.sh) && "$$venv/bin/dcml" data emoji && "$$venv/bin/dcml" zero-shot --dataset emoji

## test: run the test suite (CPU only, a few minutes)
test:
	@venv=$$(scripts/env.sh) && cd "$(CURDIR)" && "$$venv/bin/python" -m pytest -q

## bench: evaluation speed against pytorch-metric-learning (about two minutes)
bench:
	@venv=$$(scripts/env.sh) && "$$venv/bin/python" benchmarks/eval_speed.py

## env: set up the environment only and print its path
env:
	@scripts/env.sh
