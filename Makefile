# `make demo` and `make test` do all set-up themselves (see scripts/env.sh).
# Every target puts this checkout's src/ first on PYTHONPATH: the environment is shared by every
# clone with the same dependency spec, so its editable install may point at another clone.
SHELL := /bin/bash

.PHONY: demo test test-all bench bench-dnc bench-throughput bench-search bench-serve bench-gpu env

## demo: build the emoji benchmark (npm, once), train K = 1 and divide and conquer, print the comparison
demo:
	@venv=$$(scripts/env.sh) && PYTHONPATH="$(CURDIR)/src" "$$venv/bin/dcml" demo --out runs/demo

## test: the test suite without the heavy end-to-end checks (CPU only, under two minutes on 2 quiet cores)
test:
	@venv=$$(scripts/env.sh) && cd "$(CURDIR)" && PYTHONPATH="$(CURDIR)/src" "$$venv/bin/python" -m pytest -q -m "not slow"

## test-all: every test, the heavy end-to-end checks (demo, torchrun, real signals, benchmarks' CPU modes) too; what CI runs
test-all:
	@venv=$$(scripts/env.sh) && cd "$(CURDIR)" && PYTHONPATH="$(CURDIR)/src" "$$venv/bin/python" -m pytest -q

## bench: evaluation speed against pytorch-metric-learning (about two minutes)
bench:
	@venv=$$(scripts/env.sh) && PYTHONPATH="$(CURDIR)/src" "$$venv/bin/python" benchmarks/eval_speed.py

## bench-dnc: the study - variants vs K = 1 on emoji, 5 seeds, cross-vendor / leave-one-out / unseen-vendor, with intervals (CPU grid: ~80 min on 2 cores; ARGS="--variants ... --jobs N" on a GPU)
bench-dnc:
	@venv=$$(scripts/env.sh) && PYTHONPATH="$(CURDIR)/src" "$$venv/bin/python" benchmarks/dnc_study.py $(ARGS)

## bench-throughput: training images/s of the configured pipeline vs a plain float32 loop (cub200 preset; ~5 min on 2 CPU cores)
bench-throughput:
	@venv=$$(scripts/env.sh) && PYTHONPATH="$(CURDIR)/src" "$$venv/bin/python" benchmarks/throughput.py

## bench-serve: dcml serve vs in process at 1 / 8 / 32 clients, onnxruntime vs torch (~5 min on 2 CPU cores)
bench-serve:
	@venv=$$(scripts/env.sh) && PYTHONPATH="$(CURDIR)/src" "$$venv/bin/python" benchmarks/serve.py | tee benchmarks/results/serve_cpu.txt

## env: set up the environment only and print its path
env:
	@scripts/env.sh

## bench-search: load_model vs trainer embedding speed, query latency, 1M x 128 vectors in every index kind (~10 min on 2 CPU cores)
bench-search:
	@venv=$$(scripts/env.sh) && PYTHONPATH="$(CURDIR)/src" "$$venv/bin/python" benchmarks/search.py

## bench-gpu: one GPU visit: training / feature-pass / evaluation throughput to benchmarks/results/gpu_<device>.* (~8 min; --device cpu --tiny checks it)
bench-gpu:
	@venv=$$(scripts/env.sh) && PYTHONPATH="$(CURDIR)/src" "$$venv/bin/python" benchmarks/gpu.py $(ARGS)
