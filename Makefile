VENV ?= .venv
PY := $(VENV)/bin/python
SAMFIT := $(VENV)/bin/samfit

.PHONY: install test test-fast smoke clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -q -n 2 --durations=15 tests

test-fast: install
	$(PY) -m pytest -q -n 2 -m "not slow" tests

smoke: install
	$(SAMFIT) run --method lora --dataset shapes --model tiny --device cpu --out results/smoke
	$(SAMFIT) table results/smoke

clean:
	rm -rf $(VENV) results/smoke
