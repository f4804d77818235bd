# Two commands on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv and install what they need first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The torch/torchvision pair pinned here is the one known to work offline on
# the project machines; requirements.txt itself accepts any torch 2.x.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
DATA_DIR ?=
DEMO_DIR ?= runs/demo

.PHONY: venv test demo bench clean

$(VENV)/.installed: requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN) || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(PY) demo.py --output-dir $(DEMO_DIR) $(if $(DATA_DIR),--data-dir $(DATA_DIR),)

bench: venv
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache
