# Two commands for a newcomer: `make study` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test study report lab clean-venv

venv: $(STAMP)

# (Re)create the environment whenever the pins change.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

study: venv
	$(PY) -m workbench study $(STUDY_ARGS)

lab: venv
	$(VENV)/bin/jupyter lab notebooks

clean-venv:
	rm -rf $(VENV)
