# Everything installs from nothing: `make test` and `make demo` create .venv when missing
# and (re)install whenever pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch: pip takes it from the local wheel store when present, else from PyPI.
TORCH_SPEC ?= torch==2.13.0
# The Triton server the tests run (docs/triton.md): nvidia-pytriton's bundled tritonserver with the Python backend,
# 55 MB from PyPI, unpacked beside the venv without its dependencies (it asks for numpy<2, which cdae's pins exclude;
# none of its Python code runs: only the binary, its libraries and the Python-backend stub).
TRITON_SPEC ?= nvidia-pytriton==0.7.0

.PHONY: venv test test-durations test-all demo lint lock train-default evaluate-default clean

venv: $(STAMP)

# constraints.txt pins every package installed (the training environment the default records).
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/tritonserver "$(TRITON_SPEC)"
	touch $(STAMP)

# Two workers, each test file whole in one (its module fixtures and order as in a serial run): ~40 % less wall
# time on 2 cores (docs/results.md, "The test suite's time"). TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu and not tensorrt" --durations=20 \
		$(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) tests

# Records each test file's seconds in tests/durations.json, the order (longest first) make test hands files out in.
test-durations: $(STAMP)
	CDAE_RECORD_DURATIONS=1 $(MAKE) test

test-all: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(VENV)/bin/cdae demo

# The default, from scratch: the staged recipe in one config, into a scratch store; `cdae train` then says
# whether the result is the shipped default's weights bit for bit (the recorded environment: packages, and the
# CPU by family, model, stepping, cache and instruction set) or its metrics within tolerance (elsewhere).
# The shipped default cdae-default:11 is this recipe's run: 59 min wall on this project's 2-core AMD EPYC
# (family 26), 8 + 30 epochs (models/cdae-default/CHANGELOG.md).
train-default: $(STAMP)
	$(VENV)/bin/cdae train --config training/configs/cdae-default.toml --out runs/store --no-progress \
		--compare models/cdae-default/11

# Rewrites constraints.txt from the current .venv (after a deliberate upgrade).
lock: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^cdae' \
		| sed 's/^torch==\([^+]*\)+.*/torch==\1/'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache engine/*.so
