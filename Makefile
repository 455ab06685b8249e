# climseg: `make demo` trains on a synthetic data set at the real grid's pixel scale (96 fields of
# 768x1152, 5.5 GB, and a staged copy of it), `make test` runs the test suite.
# Both create the virtual environment and install what is missing first; re-running reuses what
# exists. Every variable below can be overridden: `make demo NP=4 DEMO_SAMPLES=128`.

PYTHON_BOOT ?= python3
VENV        ?= .venv
VENV_ARGS   ?=
TORCH_SPEC  ?= torch==2.13.0

NP           ?= 2
DEMO_DIR     ?= data/demo
DEMO_SAMPLES ?= 96
DEMO_SEED    ?= 1
# The real CAM5 grid: the demo model then sees features at the size it will meet them.
# yaml/demo.yaml validates on whole fields of this size; a smaller grid needs
# TRAIN_ARGS="data.validation_crop=[H,W]" to match.
DEMO_HEIGHT  ?= 768
DEMO_WIDTH   ?= 1152
SPLIT_SEED   ?= 12345
DEMO_CONFIG  ?= yaml/demo.yaml
RUN_DIR      ?= runs/demo
TRAIN_ARGS   ?=
PYTEST_ARGS  ?=
# make test's pytest-xdist workers (tests/conftest.py says why two)
TEST_WORKERS ?= 2
HOROVOD      ?= 1

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:

# The venv's bin comes first, so `python`, `horovodrun`, `mpicxx` below are the venv's.
VENV_BIN := $(abspath $(VENV))/bin
export PATH := $(VENV_BIN):$(PATH)
PY       := $(VENV_BIN)/python
STAMPS   := $(VENV)/.climseg-stamps
HOROVODRUN := horovodrun -np $(NP) --gloo

.PHONY: help install horovod test test-fast test-gpu demo demo-data clean-demo

help:
	@echo "make demo     install, make a synthetic data set, train $(DEMO_CONFIG) with $(NP) ranks"
	@echo "make test     install, run the whole test suite (python -m pytest -q tests)"
	@echo "make test-fast  install, run the unit-level tests only (-m \"not slow\": no horovodrun,"
	@echo "              mpiexec, Slurm or training beyond a step); a few minutes on 2 cores"
	@echo "make install  virtual environment $(VENV): requirements, torch, Horovod, then climseg"
	@echo "              HOROVOD=0: no Horovod build, for the torch engine only (docs/engines.md)"
	@echo "              itself (editable): the \`climseg\` command, \`python -m climseg.train\` anywhere"
	@echo "make test-gpu on a GPU node: Horovod with NCCL, the CUDA tests, full-size benches, one table"
	@echo "make clean-demo  remove $(DEMO_DIR), $(RUN_DIR) and the demo runs moved aside ($(RUN_DIR).replaced-*)"

# --- install ----------------------------------------------------------------------------------
# HOROVOD=0 skips the Horovod build (for clusters where it cannot be built): climseg then runs
# with dist.engine=torch under torchrun or srun (docs/engines.md). `make test` still needs it.
ifeq ($(HOROVOD),0)
HOROVOD_DEP := $(STAMPS)/requirements $(STAMPS)/torch
else
HOROVOD_DEP := horovod
endif

install: $(HOROVOD_DEP) $(STAMPS)/climseg

$(PY):
	$(PYTHON_BOOT) -m venv $(VENV_ARGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMPS)/requirements: requirements.txt | $(PY)
	$(PY) -m pip install -r requirements.txt
	@mkdir -p $(STAMPS) && touch $@

# Keep a torch that is already importable (a cluster's or container's CUDA build, visible with
# VENV_ARGS=--system-site-packages); otherwise install the pinned one.
$(STAMPS)/torch: | $(PY)
	@if $(PY) -c 'import torch' 2>/dev/null; then \
	    echo "keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
	    $(PY) -m pip install '$(TORCH_SPEC)'; \
	fi
	@mkdir -p $(STAMPS) && touch $@

# No stamp: the script itself skips the build in seconds when the installed Horovod matches
# (version, torch, CUDA, MPI, features), and rebuilds when any of them changed.
horovod: $(STAMPS)/requirements $(STAMPS)/torch
	PYTHON=$(PY) tools/install_horovod.sh

# climseg itself, editable (the checkout is what runs), last: --no-deps so that pip never
# replaces the torch kept above, --no-build-isolation so that no package index is needed.
$(STAMPS)/climseg: pyproject.toml | $(HOROVOD_DEP)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@mkdir -p $(STAMPS) && touch $@

# --- test -------------------------------------------------------------------------------------
# CLIMSEG_REQUIRE_INSTALL turns every skip for a missing part of the install (Horovod, mpiexec,
# ...) into a failure; only the GPU and Slurm skips stay (tests/conftest.py lists them).
TEST_ENV := CLIMSEG_REQUIRE_INSTALL=1 CLIMSEG_REQUIRE_HOROVOD=1
test: install
	$(TEST_ENV) python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests $(PYTEST_ARGS)

# The tests not marked slow (the marks: pyproject.toml, tests/conftest.py).
test-fast: install
	$(TEST_ENV) python -m pytest -q -m "not slow" tests $(PYTEST_ARGS)

# On a GPU node: Horovod with NCCL, tests/test_cuda.py, full-size step/LAMB/loader/train
# benches, one table (tools/gpu_check.sh; docs/performance.md). No install dependency: a bare
# GPU node brings its own Python and torch.
test-gpu:
	tools/gpu_check.sh

# --- docs -------------------------------------------------------------------------------------
# docs/config.md from climseg/config.py and the descriptions in climseg/config_doc.py
# (tests/test_docs.py fails when they drift). Needs the installed venv (`make install`).
.PHONY: docs
docs:
	$(PY) -m climseg.config_doc --output docs/config.md

# --- demo -------------------------------------------------------------------------------------
# Each data step leaves a stamp under $(DEMO_DIR)/.stamps (outside the data folders, which the
# tools read). The synthetic-data settings are recorded so that changing them redoes the chain.
$(if $(strip $(DEMO_DIR)),,$(error DEMO_DIR is empty))
$(if $(shell [[ '$(NP)' =~ ^[1-9][0-9]*$$ ]] && echo ok),,$(error NP=$(NP): expected a positive number of ranks))
DEMO_STAMPS := $(DEMO_DIR)/.stamps
DATA_PARAMS := samples=$(DEMO_SAMPLES) seed=$(DEMO_SEED) height=$(DEMO_HEIGHT) width=$(DEMO_WIDTH) split_seed=$(SPLIT_SEED)
STAGE_PARAMS := np=$(NP)

# A params file is rewritten (and so redoes what depends on it) only when its settings change.
# Done while the Makefile is read, so that `make -n demo` shows what a real run would do.
define record_params
$(shell mkdir -p $(dir $1) && if [ "$$(cat $1 2>/dev/null)" != "$2" ]; then echo "$2" > $1; fi)
endef
ifneq ($(filter demo demo-data,$(MAKECMDGOALS)),)
$(call record_params,$(DEMO_STAMPS)/data-params,$(DATA_PARAMS))
$(call record_params,$(DEMO_STAMPS)/stage-params,$(STAGE_PARAMS))
endif

$(DEMO_STAMPS)/raw: $(DEMO_STAMPS)/data-params | install
	rm -rf $(DEMO_DIR)/raw
	python tools/make_synthetic.py --out $(DEMO_DIR)/raw --samples $(DEMO_SAMPLES) --seed $(DEMO_SEED) --height $(DEMO_HEIGHT) --width $(DEMO_WIDTH)
	@touch $@

# The split tool refuses a non-empty output folder; this rule runs only when the stamp is
# missing or older than the raw data, so what is there is stale and --force replaces it.
$(DEMO_STAMPS)/split: $(DEMO_STAMPS)/raw
	python tools/split_data.py --input $(DEMO_DIR)/raw --output $(DEMO_DIR)/cam --seed $(SPLIT_SEED) $(if $(wildcard $(DEMO_DIR)/cam),--force,)
	@touch $@

$(DEMO_STAMPS)/summary: $(DEMO_STAMPS)/split
	python tools/summarize_data.py --data $(DEMO_DIR)/cam
	@touch $@

$(DEMO_STAMPS)/checked: $(DEMO_STAMPS)/summary
	python tools/check_data.py $(DEMO_DIR)/cam
	@touch $@

$(DEMO_STAMPS)/staged: $(DEMO_STAMPS)/checked $(DEMO_STAMPS)/stage-params
	rm -rf $(DEMO_DIR)/staged
	$(HOROVODRUN) python tools/stage_data.py --source $(DEMO_DIR)/cam --dest $(DEMO_DIR)/staged --splits train validation test
	@touch $@

demo-data: $(DEMO_STAMPS)/staged

# A re-run starts over: overwrite=true moves the previous run aside to
# $(RUN_DIR).replaced-DATE (nothing is deleted; clean-demo removes them). TRAIN_ARGS=resume=auto
# continues the previous run instead.
DEMO_OVERWRITE := $(if $(findstring resume=,$(TRAIN_ARGS)),,overwrite=true)
demo: install demo-data
	@if [[ -n "$(DEMO_OVERWRITE)" && -n "$$(ls -A $(RUN_DIR) 2>/dev/null | grep -v '^\.climseg\.lock$$')" ]]; then \
	    echo "make demo: $(RUN_DIR) holds the previous demo run: it moves to $(RUN_DIR).replaced-<date> and this run starts over (TRAIN_ARGS=resume=auto continues it; make clean-demo removes them all)"; \
	fi
	$(HOROVODRUN) python -m climseg.train --config $(DEMO_CONFIG) data.root=$(DEMO_DIR)/staged output_dir=$(RUN_DIR) $(DEMO_OVERWRITE) $(TRAIN_ARGS)

clean-demo:
	rm -rf $(DEMO_DIR) $(RUN_DIR) $(RUN_DIR).replaced-*
