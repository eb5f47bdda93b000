VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install run test bench compile

# One environment with everything: the library, kfp, kserve, and the test tools.
$(VENV)/.installed: setup.cfg requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.txt -e ".[all,dev]"
	touch $@

install: $(VENV)/.installed

# The main job: the whole pipeline locally (kfp.local) on a small sample, ending with a served prediction.
run: install
	$(VENV)/bin/kubeseg run

# The test suite (what CI runs).
test: install
	$(PY) -m pytest

compile: install
	$(VENV)/bin/kubeseg compile
