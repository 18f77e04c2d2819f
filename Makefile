# KEEP:R: the two entry points. Both create the virtual environment in .venv when it is missing or out of date.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench clean-demo app

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null || \
		{ echo "error: Python 3.11 or newer is needed; $(PYTHON) is $$($(PYTHON) -V 2>&1) (use make PYTHON=python3.11)" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

## make demo: tiny models -> tiny pair set -> short encoder run -> anonymize data/samples/lrwp9a.mpg
demo: $(STAMP)
	bash scripts/demo.sh

## make app: the web page on http://127.0.0.1:8000 (the demo's tiny models, with a banner, when the official weights
## are missing); APP_ARGS passes options, e.g. make app APP_ARGS="--config configs/infer/default.yaml"
app: $(STAMP)
	$(PY) -m webapp $(APP_ARGS)

## make test: the whole test suite, slow end-to-end tests included
test: $(STAMP)
	$(PY) -m pytest -q

## make test-fast: skip the slow end-to-end tests
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

## make bench: the benchmarks (not tests), quick settings
bench: $(STAMP)
	$(PY) -m bench.generator --quick --precision 32,bf16
	$(PY) -m bench.cosegmentation --quick
	$(PY) -m bench.official_cosegmentation --quick
	$(PY) -m bench.e2e --quick
	$(PY) -m bench.infer --quick
	bash bench/gpu_check.sh $(PY)

clean-demo:
	rm -rf outputs/demo
