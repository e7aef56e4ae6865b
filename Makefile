# Two commands do all the set-up on a fresh machine:
#   make demo   store and recall memories on the embedded default (no API key)
#   make test   run the test suite
# Each creates its virtual environments when they are missing or stale. Neither installs torch:
# the default embedder (all-MiniLM-L6-v2) ships inside the package and runs on ONNX Runtime,
# and scripts/check_torch.py stops the build if torch or a CUDA package got in.
#
# The tests run twice over the openai client: in .venv with the newest openai (3.x), and in
# .venv-openai2 with openai 2.x, where llama-index's OpenAI LLM packages (they pin openai<3)
# can be installed too. Tests marked `openai2` need those packages and run only there; tests
# marked `openai_client` drive the openai client and run in both.
#
#   make test-torch   the tests marked `sentence_transformers` (the shipped model against the
#                     original float32 one, and scripts/build_local_model.py reproducing it), in
#                     .venv-torch with torch's CPU build. PyPI's Linux torch is the CUDA build,
#                     so torch comes first, alone, from TORCH_INDEX (a wheel folder named in
#                     PIP_FIND_LINKS serves too), and the check refuses anything else.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VENV2 := .venv-openai2
PY2 := $(VENV2)/bin/python
STAMP2 := $(VENV2)/.installed
VENV_TORCH := .venv-torch
PY_TORCH := $(VENV_TORCH)/bin/python
STAMP_TORCH := $(VENV_TORCH)/.installed
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_VERSION ?= 2.13.0
# the suite on two worker processes (pytest-xdist), each test file whole on one of them: 8-11
# minutes instead of 16-18 on 2 cores. `make test TEST_WORKERS=` runs it in one process.
TEST_WORKERS ?= -n 2 --dist loadfile

.PHONY: demo test test-torch lint docs bench bench-quick clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[all,dev]"
	$(PY) scripts/check_torch.py absent
	touch $(STAMP)

$(STAMP2): pyproject.toml
	test -x $(PY2) || $(PYTHON) -m venv $(VENV2)
	$(PY2) -m pip install --quiet --upgrade pip
	$(PY2) -m pip install --quiet -e ".[all,dev]" "openai>=2,<3" "llama-index-llms-openai-like>=0.8,<0.9"
	$(PY2) scripts/check_torch.py absent
	touch $(STAMP2)

$(STAMP_TORCH): pyproject.toml
	test -x $(PY_TORCH) || $(PYTHON) -m venv $(VENV_TORCH)
	$(PY_TORCH) -m pip install --quiet --upgrade pip
	$(PY_TORCH) -m pip install --quiet --no-deps --index-url $(TORCH_INDEX) "torch==$(TORCH_VERSION)"
	$(PY_TORCH) -m pip install --quiet -e ".[sentence-transformers,dev]"
	$(PY_TORCH) scripts/check_torch.py cpu
	touch $(STAMP_TORCH)

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP) $(STAMP2)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest -q $(TEST_WORKERS) -m "not openai2 and not sentence_transformers"
	$(PY2) -m pytest -q $(TEST_WORKERS) -m "(openai2 or openai_client) and not sentence_transformers"

test-torch: $(STAMP_TORCH)
	# only the files with such tests: the others import extras .venv-torch does not install
	$(PY_TORCH) -m pytest -q -m sentence_transformers tests/test_embeddings.py tests/test_install.py

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
	rm -rf $(VENV) $(VENV2) $(VENV_TORCH) .headroom-memory-demo .pytest_cache .mypy_cache .ruff_cache
