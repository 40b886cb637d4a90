# `make demo` and `make test` do all set-up themselves (see scripts/env.sh).
SHELL := /bin/bash

.PHONY: demo test bench bench-dnc env

## demo: build the emoji benchmark (npm, once), train K = 1 and divide and conquer, print the comparison
demo:
	@venv=$$(scripts/env.sh) && "$$venv/bin/dcml" demo --out runs/demo

## test: run the test suite (CPU only, a few minutes)
test:
	@venv=$$(scripts/env.sh) && cd "$(CURDIR)" && "$$venv/bin/python" -m pytest -q

## bench: evaluation speed against pytorch-metric-learning (about two minutes)
bench:
	@venv=$$(scripts/env.sh) && "$$venv/bin/python" benchmarks/eval_speed.py

## bench-dnc: K = 1 vs divide and conquer variants on emoji over 3 seeds (about 45 minutes on 2 cores)
bench-dnc:
	@venv=$$(scripts/env.sh) && "$$venv/bin/python" benchmarks/dnc_vs_single.py

## env: set up the environment only and print its path
env:
	@scripts/env.sh
