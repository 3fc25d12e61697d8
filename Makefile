# Two commands: `make demo` (train and sample a small model on CPU) and `make test`.
# Both create .venv when needed and install the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The local CPU build on a machine without a GPU; override (e.g. TORCH_SPEC=torch) on a CUDA machine.
TORCH_SPEC ?= torch==2.13.0
# Where the demo keeps its corpus, tokenizer and checkpoints.
DEMO_DIR ?= $(CURDIR)/.tritonchat

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	TRITONCHAT_BASE_DIR=$(DEMO_DIR) $(PY) -m scripts.tok_train --vocab-size 4096
	TRITONCHAT_BASE_DIR=$(DEMO_DIR) $(PY) -m train --depth=4 --max-seq-len=256 --device-batch-size=16 \
		--total-batch-size=8192 --num-iterations=300 --eval-every=50 --eval-tokens=65536 \
		--save-every=-1 --sample-every=-1 --run=demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
