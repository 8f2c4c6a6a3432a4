# Two commands on a fresh clone; each sets up .venv itself the first time.
#
#   make demo     set up, write a demo run, export it to int4, verify the artifact
#   make test     set up, run the test suite (extra pytest args: make test PYTEST_ARGS="-k gguf")
#   make clean    remove the demo folders (the .venv stays; rm -rf .venv for a fresh install)
#
# GNU make only. The venv's own binaries are called by path; nothing is activated.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EFEXPORT := $(VENV)/bin/efexport
# Written after a complete install; pyproject.toml newer than it (or no stamp) means install again.
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# llama-cpp-python compiles llama.cpp; portable flags because pip caches the built wheel.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

DEMO_DIRS := demo_run demo_artifact demo_gguf demo_peft

.DEFAULT_GOAL := help
.PHONY: help install demo test clean

help:
	@echo "make demo    set up .venv, write demo_run/, export it (int4) to demo_artifact/ and verify it"
	@echo "make test    set up .venv, then python -m pytest -q \$$PYTEST_ARGS (e.g. PYTEST_ARGS=\"-k gguf\")"
	@echo "make clean   remove $(DEMO_DIRS)"

install: $(STAMP)

# A venv whose python or pip does not run (missing, half-created, interpreter moved) is
# (re)created in place; a working one is reused. torch goes in first: it pins the local CPU
# build before anything can pull a multi-GB CUDA one.
$(STAMP): pyproject.toml
	@if ! $(PY) -m pip --version >/dev/null 2>&1; then \
	    echo "$(PYTHON) -m venv $(VENV)"; $(PYTHON) -m venv $(VENV); fi
	@echo "Installing efexport into $(VENV) (the first time compiles llama.cpp: about 10 minutes on 2 cores)"
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install --quiet -e '.[test,gguf]'
	@touch $@

demo: $(STAMP)
	rm -rf demo_run
	$(PY) examples/make_demo_run.py demo_run
	$(EFEXPORT) demo_run --checkpoint best --precision int4 --out demo_artifact --force
	$(EFEXPORT) verify demo_artifact

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO_DIRS)
