# `make run` and `make test` work on a fresh machine: each builds the virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed in the same pip command as the project so that no dependency pulls another build.
TORCH ?= torch==2.13.0
# llama-cpp-python compiles llama.cpp on install; its multimodal part is not needed here.

.PHONY: run test compare params benchmark clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(VENV)/bin/pip install --quiet "$(TORCH)" -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(PY) -m pipeline stage=all

test: $(VENV)/.installed
	$(PY) -m pytest

# The fp32 / bf16 / fp16 comparison and its report, as DVC stages (reruns only what changed).
compare: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

# params.yaml is the composed Hydra config that dvc.yaml's stages read; rewrite it after editing conf/.
params: $(VENV)/.installed
	$(PY) -m pipeline --cfg job --resolve > params.yaml

benchmark: $(VENV)/.installed
	$(PY) benchmarks/train_overhead.py
	$(PY) benchmarks/gguf_export.py

clean:
	rm -rf artifacts dvc mlruns mlflow.db outputs multirun
