# Two commands do all the set-up on a fresh machine:
#   make demo   store and recall memories on the embedded default (no API key)
#   make test   run the test suite
# Each creates its virtual environments (torch's CPU wheel first, then the package) when they
# are missing or stale.
#
# The tests run twice over the openai client: in .venv with the newest openai (3.x), and in
# .venv-openai2 with openai 2.x, where llama-index's OpenAI LLM packages (they pin openai<3)
# can be installed too. Tests marked `openai2` need those packages and run only there; tests
# marked `openai_client` drive the openai client and run in both.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VENV2 := .venv-openai2
PY2 := $(VENV2)/bin/python
STAMP2 := $(VENV2)/.installed

.PHONY: demo test lint docs bench bench-quick clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[all,dev]"
	touch $(STAMP)

$(STAMP2): pyproject.toml
	test -x $(PY2) || $(PYTHON) -m venv $(VENV2)
	$(PY2) -m pip install --quiet --upgrade pip
	$(PY2) -m pip install --quiet "torch==2.13.0"
	$(PY2) -m pip install --quiet -e ".[all,dev]" "openai>=2,<3" "llama-index-llms-openai-like>=0.8,<0.9"
	touch $(STAMP2)

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP) $(STAMP2)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest -q -m "not openai2"
	$(PY2) -m pytest -q -m "openai2 or openai_client"

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

docs: $(STAMP)
	$(PY) -m mkdocs build --strict

bench: $(STAMP)
	$(PY) -m benchmarks

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) $(VENV2) .headroom-memory-demo .pytest_cache .mypy_cache .ruff_cache
