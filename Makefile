# Two commands: `make demo` (train and sample a small model on CPU) and `make test`.
# Both create .venv when needed and install the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The local CPU build on a machine without a GPU; override (e.g. TORCH_SPEC=torch) on a CUDA machine.
TORCH_SPEC ?= torch==2.13.0
# Where the demo keeps its corpus, tokenizer and checkpoints. Commands run from this folder find ./.tritonchat
# without flags (engine/paths.py), so `python -m scripts.chat_cli` answers from the demo's model.
DEMO_DIR ?= $(CURDIR)/.tritonchat

.PHONY: install demo chat-demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	TRITONCHAT_BASE_DIR=$(DEMO_DIR) $(PY) -m scripts.tok_train --vocab-size 4096
	# A CPU-sized run: 150 steps of 4096 tokens. The recipe scales learning rates by sqrt(batch / 2^19),
	# which at this tiny batch would leave them ~11x too small for a few minutes of training, so the
	# base rates are raised 10x here.
	TRITONCHAT_BASE_DIR=$(DEMO_DIR) $(PY) -m train --depth=4 --max-seq-len=256 --device-batch-size=16 \
		--total-batch-size=4096 --num-iterations=150 --eval-every=50 --eval-tokens=32768 \
		--matrix-lr=0.2 --embedding-lr=3.0 --unembedding-lr=0.08 --scalar-lr=5.0 \
		--save-every=-1 --sample-every=-1 --log-every=10 --run=demo

# After `make demo`: fine-tune its model on the generated spelling tasks (answers with a calculator call), score it,
# and ask it a counting question (a few minutes on a CPU).
chat-demo: install
	TRITONCHAT_BASE_DIR=$(DEMO_DIR) $(PY) -m scripts.chat_sft --tasks SpellingBee:0.005,SimpleSpelling:0.002 \
		--num-iterations=120 --max-seq-len=256 --device-batch-size=16 --total-batch-size=4096 --eval-every=40 \
		--eval-tokens=8192 --log-every=20
	TRITONCHAT_BASE_DIR=$(DEMO_DIR) $(PY) -m scripts.chat_eval -i sft -a SpellingBee --max-problems 40 --batch-size 20
	TRITONCHAT_BASE_DIR=$(DEMO_DIR) $(PY) -m scripts.chat_cli -i sft -p "How many r are in strawberry?" --temperature 0

# One pytest worker per core (pytest-xdist), a file per worker at a time: the module fixtures are built once.
# For benchmarks run pytest directly (`pytest bench/ --benchmark`): xdist would switch their timing off.
test: install
	$(PY) -m pytest -q -n auto --dist loadfile

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
