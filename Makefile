VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install run test test-containers images bench compile

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

# Build the three images (trainer, predictor, predictor-gpu) with docker or podman:
#   make images [REGISTRY=ghcr.io/ORG] [TAG=1.0] [PUSH=1]
# then point the pipeline and the manifests at them: kubeseg compile --registry ... --tag ...
images:
	$(PYTHON) images/build.py $(if $(REGISTRY),--registry $(REGISTRY)) $(if $(TAG),--tag $(TAG)) $(if $(PUSH),--push)

# The images built here with podman (from a base image made of Debian's packages), then the
# whole pipeline run with every step in its image and the model served from the predictor image.
test-containers: install
	bash images/setup-podman.sh
	KUBESEG_CONTAINER_TESTS=1 $(PY) -m pytest tests/containers
