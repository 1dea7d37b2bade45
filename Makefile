# make demo: a small FashionMNIST -> MNIST audit end to end.   make test: the test suite.
# Both create .venv when missing. Data root: OOD_AUDIT_DATA, else ../shared/data when it
# exists, else ~/.cache/ood-audit/data; the demo downloads FashionMNIST and MNIST there
# when they are missing (`ood-audit fetch`).

VENV ?= .venv
PY := $(VENV)/bin/python
OOD := $(PY) -m ood_audit
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
	$(OOD) fetch fashionmnist mnist  # a no-op when both are there; else torchvision downloads them
	rm -rf $(DEMO_RUN)  # the demo starts over each time; keep a run elsewhere with --out
	$(OOD) train --config examples/demo.yaml --out $(DEMO_RUN)
	$(OOD) score --run $(DEMO_RUN) --ood mnist --ood noise-uniform --limit 2000
	$(OOD) decompose --run $(DEMO_RUN)
	$(OOD) report $(DEMO_RUN) --out $(DEMO_RUN)/report

test: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check ood_audit tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
