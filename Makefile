# Everything installs from nothing: `make test` and `make demo` create .venv when missing
# and (re)install whenever pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch: pip takes it from the local wheel store when present, else from PyPI.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test test-all demo lint lock train-default evaluate-default clean

venv: $(STAMP)

# constraints.txt pins every package installed (the training environment the default records).
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu and not tensorrt" --durations=20 tests

test-all: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(VENV)/bin/cdae demo

# The shipped default, from scratch: the staged recipe in one config, into a scratch store; `cdae train`
# then says whether the result is the shipped package's weights bit for bit (same recorded environment)
# or its metrics within tolerance (another environment). About 30 min of this 2-core CPU when it is free.
train-default: $(STAMP)
	$(VENV)/bin/cdae train --config training/configs/cdae-default.toml --out runs/store --no-progress \
		--compare models/cdae-default/8

# Rewrites constraints.txt from the current .venv (after a deliberate upgrade).
lock: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^cdae' \
		| sed 's/^torch==\([^+]*\)+.*/torch==\1/'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
