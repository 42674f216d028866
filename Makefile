# Two entry points for a fresh machine; each installs what it needs into ./.venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test install

# Training needs no torch: the demo skips its ~750 MB install.
$(VENV)/.installed-train: requirements-train.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-train.txt
	touch $@

$(VENV)/.installed: requirements.txt requirements-plan.txt $(VENV)/.installed-train
	$(PY) -m pip install -q -r requirements.txt
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed-train
	$(PY) launch/train.py --config configs/demo.py --workdir $(WORKDIR)
	$(PY) launch/eval.py --config configs/demo.py --workdir $(WORKDIR)

test: install
	$(PY) -m pytest -q tests
