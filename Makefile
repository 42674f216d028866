# Two entry points for a fresh machine; each installs what it needs into ./.venv first, the vlm_jax package
# (editable, with its vlm-* commands) included.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test install

# Training needs no torch: the demo skips its ~750 MB install.
$(VENV)/.installed-train: requirements-train.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-train.txt -e .
	touch $@

$(VENV)/.installed: requirements.txt requirements-plan.txt requirements-convert.txt $(VENV)/.installed-train
	$(PY) -m pip install -q -r requirements.txt
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed-train
	$(VENV)/bin/vlm-train --config configs/demo.py --workdir $(WORKDIR)
	$(VENV)/bin/vlm-eval --workdir $(WORKDIR)

test: install
	$(PY) -m pytest -q tests
