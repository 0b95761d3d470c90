VENV ?= .venv
PY := $(VENV)/bin/python
SAMFIT := $(VENV)/bin/samfit

.PHONY: install test test-fast smoke clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	# Meta's SAM 2 (an sdist): built against the venv's torch (no build isolation, which would fetch another
	# torch) and without its optional CUDA extension (SAM2_BUILD_CUDA=0), so it installs on any machine
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q --no-build-isolation sam2==1.1.0
	touch $@

# Two test workers with one thread each (also in the samfit processes the tests start): no oversubscription.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --durations=15 tests

test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 -m "not slow" tests

smoke: install
	$(SAMFIT) run --method lora --dataset shapes --model tiny --device cpu --out results/smoke
	$(SAMFIT) table results/smoke

clean:
	rm -rf $(VENV) results/smoke
