# make demo: a small FashionMNIST -> MNIST audit end to end.   make test: the test suite.
# Both create .venv when missing. The data root comes from OOD_AUDIT_DATA, else ../shared/data.

VENV ?= .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
# On x86_64 install the tested torch/torchvision pair; elsewhere let pip pick.
CONSTRAINTS := $(if $(filter x86_64,$(ARCH)),-c constraints/x86_64.txt,)
OOD_AUDIT_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export OOD_AUDIT_DATA
DEMO_RUN ?= runs/demo

.PHONY: venv demo test lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints/x86_64.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[dev]'
	touch $@

demo: venv
	rm -rf $(DEMO_RUN)  # the demo starts over each time; keep a run elsewhere with --out
	$(VENV)/bin/ood-audit train --config examples/demo.yaml --out $(DEMO_RUN)
	$(VENV)/bin/ood-audit score --run $(DEMO_RUN) --ood mnist --ood noise-uniform --limit 2000
	$(VENV)/bin/ood-audit decompose --run $(DEMO_RUN)
	$(VENV)/bin/ood-audit report $(DEMO_RUN) --out $(DEMO_RUN)/report

test: venv
	$(VENV)/bin/python -m pytest -q

lint: venv
	$(VENV)/bin/ruff check ood_audit tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
