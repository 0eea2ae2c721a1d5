# Two commands for a newcomer: `make demo` (the pipeline on the built-in dataset) and `make test`.
# Both create .venv on first use. A Python that already imports torch + torchvision keeps them
# (the venv sees system packages); otherwise the pinned versions in constraints.txt are installed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA ?= data/demo
ARGS ?=

.PHONY: help install demo demo-data train-tokenizer reconstruct test lint clean-demo

help:
	@echo "make demo             - demo data -> train tokenizer -> reconstructions (CPU, minutes)"
	@echo "make test             - run the test suite"
	@echo "make train-tokenizer  - train a tokenizer (Hydra overrides via ARGS='key=value ...')"
	@echo "make lint             - ruff"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv --system-site-packages $(VENV)
	@if $(PY) -c "import torch, torchvision" 2>/dev/null; then \
		echo "using the torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
		$(PY) -m pip install -q -e '.[dev]'; \
	else \
		$(PY) -m pip install -q -c constraints.txt -e '.[dev]'; \
	fi
	# Offline perceptual weights (shift-tolerant LPIPS VGG); its code is not imported, so no deps.
	$(PY) -m pip install -q --no-deps stlpips-pytorch==0.0.2
	touch $(STAMP)

install: $(STAMP)

demo-data: $(STAMP)
	$(PY) tools/make_demo_data.py root=$(DEMO_DATA)

train-tokenizer: $(STAMP)
	$(PY) -m pipelines.train_tokenizer $(ARGS)

demo: demo-data
	$(PY) -m pipelines.train_tokenizer data.root=$(DEMO_DATA) run_dir=runs/tokenizer_demo $(ARGS)
	$(PY) tools/reconstruct.py ckpt=runs/tokenizer_demo input=$(DEMO_DATA)/val out=runs/tokenizer_demo/reconstruct max_images=16
	@echo "demo done: see runs/tokenizer_demo/ (eval.json, images/, reconstruct/)"

test: $(STAMP)
	$(PY) -m pytest -q --durations=8

lint: $(STAMP)
	$(PY) -m ruff check .

clean-demo:
	rm -rf runs/tokenizer_demo
