# The two commands of README.md: `make demo` (main job) and `make test` (test suite). Each sets up .venv first.
.PHONY: setup demo test bench bench-ludwig docs
# bash with pipefail: a benchmark that fails under `| tee` fails the target too
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/cadenza experiment --config examples/sentiment.yaml --dataset rotten_tomatoes_sentiment

test: setup
	.venv/bin/python -m pytest -q

docs: setup
	.venv/bin/python -m cadenza.docs_gen

bench: setup
	mkdir -p bench/results
	.venv/bin/python bench/bench_ecd.py | tee bench/results/ecd.txt
	.venv/bin/python bench/bench_llm.py --rounds 2 | tee bench/results/llm.txt

# Ludwig 0.11 side by side on the README task (its own environment in bench/.ludwig-venv, made on first use)
bench-ludwig: setup
	mkdir -p bench/results
	.venv/bin/python bench/bench_ludwig.py --rounds 3 | tee bench/results/ludwig.txt
