# Two commands for a newcomer: `make study` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test study report writeup lab clean-venv system-deps

# make study writes the study into WORK_DIR and its write-up bundle (report, records, plan,
# environment, reproduce.sh) into BUNDLE; override either, e.g. make study BUNDLE=/tmp/run1.
WORK_DIR ?= data
BUNDLE ?= data/bundle

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
	$(PY) -m workbench study --work-dir $(WORK_DIR) $(STUDY_ARGS)
	$(PY) -m workbench report --work-dir $(WORK_DIR) --out $(BUNDLE)

# The study, then every notebook run on its work dir, all in the bundle (a few minutes more).
writeup: study
	$(PY) -m workbench report --work-dir $(WORK_DIR) --out $(BUNDLE) --execute-notebooks

# The bundle again from a finished study (e.g. with executed notebooks: REPORT_ARGS="--notebooks DIR").
report: venv
	$(PY) -m workbench report --work-dir $(WORK_DIR) --out $(BUNDLE) $(REPORT_ARGS)

lab: venv
	$(VENV)/bin/jupyter lab notebooks

clean-venv:
	rm -rf $(VENV)

# Debian packages the tests need, as command:package pairs (a test that needs a missing one is
# skipped and says so): the cross g++ for the armv7 and aarch64 targets, qemu-user with binfmt for
# the emulated aarch64 board (python -m workbench board, tests/test_board.py), Chromium for the
# browser test.
SYSTEM_DEPS := aarch64-linux-gnu-g++:g++-aarch64-linux-gnu \
	arm-linux-gnueabihf-g++:g++-arm-linux-gnueabihf \
	qemu-aarch64-static:qemu-user-static \
	update-binfmts:binfmt-support \
	chromium:chromium
system-deps:
	@missing=$$(for dep in $(SYSTEM_DEPS); do c=$${dep%%:*}; command -v $$c >/dev/null || [ -x /usr/sbin/$$c ] || echo $${dep#*:}; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "note: missing Debian packages:" $$missing "(as root: apt-get install" $$missing")"; fi
