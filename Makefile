# Everything installs from nothing: `make test` and `make demo` create .venv when missing
# and (re)install whenever pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch: pip takes it from the local wheel store when present, else from PyPI.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test test-all demo lint train-default evaluate-default clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu and not tensorrt" tests

test-all: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(VENV)/bin/cdae demo

# Re-runs the command recorded in the shipped default model's manifest (cdae-default:7, fine-tuned
# from cdae-default:6, itself from :5, :4, :3 and :2, whose own recipe is training/configs/default.toml)
# into a scratch store; compare the sha256 with `cdae models show cdae-default:7`.
train-default: $(STAMP)
	rm -rf runs/store/cdae-default/7 && mkdir -p runs/store/cdae-default && cp -r models/cdae-default/6 runs/store/cdae-default/
	$(VENV)/bin/cdae train --config training/configs/cdae-default-7.toml --out runs/store

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
