# imdpipe Makefile. A fresh machine needs exactly two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-pinned.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-pinned.txt
	$(PY) -m pip install --quiet -c requirements-pinned.txt -e '.[dev]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(VENV)/bin/imdpipe demo --out demo --seed 0

bench: setup
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: setup
	$(VENV)/bin/ruff check imdpipe tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info

# ---------------------------------------------------------------------------------------------
# Reproducing the paper on real datasets already on disk (the same commands a user could type;
# `make -n k400 DATA=... CACHE=...` prints them). Paper settings: base size from ImageNet-21K
# ViT weights, BERT-base SAVLD, K=10, Ya=20, alpha=0.25, masking M, IoU, and TimeSformer's
# Kinetics recipe (--recipe paper: SGD lr 0.005, step decay at epochs 11 and 14, batch 64,
# 15 epochs). GPUS=N launches torchrun. README "Reproducing the paper" lists every setting.
# ---------------------------------------------------------------------------------------------
DATA ?=
CACHE ?=
SIZE ?= base
FUSION ?= imd
CROSS_MODAL_P ?= 0.5
RUN ?= $(CACHE)/runs/$(FUSION)-$(SIZE)
GPUS ?= 1
SPLIT ?= 1
RECIPE ?= paper
AUDIO_MODEL ?= MIT/ast-finetuned-audioset-10-10-0.4593
TEXT_MODEL ?= bert-base-uncased
# the paper's ImageNet-21K ViT of each size (timm names; small has none: pass a file or INIT=none)
INIT_small :=
INIT_base := vit_base_patch16_224.augreg_in21k
INIT_large := vit_large_patch16_224.augreg_in21k
INIT ?= $(INIT_$(SIZE))
K400_ANNOTATIONS ?= $(DATA)/annotations/train.csv $(DATA)/annotations/validate.csv
K400_EVAL_SPLIT ?= val
K400_LABELS ?= kinetics400
TRAIN_OPTS ?=
IMDPIPE := $(VENV)/bin/imdpipe
ifeq ($(GPUS),1)
TRAIN := $(IMDPIPE) train
STAGE_LAUNCH :=
else
TRAIN := $(VENV)/bin/torchrun --standalone --nproc_per_node $(GPUS) -m imdpipe train
STAGE_LAUNCH := $(VENV)/bin/torchrun --standalone --nproc_per_node $(GPUS) -m imdpipe
endif
INIT_OPT := $(if $(filter none,$(INIT)),--from-scratch,--init-checkpoint $(INIT))
PAPER_TRAIN := --size $(SIZE) --recipe $(RECIPE) --fusion $(FUSION) --alpha 0.25 --scheme M --batch-size 64 \
	--epochs 15 --cross-modal-p $(CROSS_MODAL_P) $(INIT_OPT) $(TRAIN_OPTS)
SAVLD_OPTS := --k 10 --relevance-k 10 --ya 20 --overlap iou --metric cosine --plot $(if $(TEXT_MODEL),--text-model $(TEXT_MODEL))

.PHONY: k400 ucf101 hmdb51 _stages _check_paths _preflight
_check_paths:
	@test -n "$(DATA)" -a -n "$(CACHE)" || { echo "usage: make $(MAKECMDGOALS) DATA=/path/to/dataset CACHE=/path/to/cache [GPUS=N]"; exit 2; }

# the models every stage will need, checked before the first stage starts (one message naming the variables)
_preflight:
	$(PY) -m imdpipe.cli.preflight AUDIO_MODEL=audio:$(AUDIO_MODEL) INIT=init:$(INIT) $(if $(TEXT_MODEL),TEXT_MODEL=text:$(TEXT_MODEL))

_stages:
	$(if $(STAGE_LAUNCH),$(STAGE_LAUNCH),$(IMDPIPE)) extract-flow --cache $(CACHE)
	$(if $(STAGE_LAUNCH),$(STAGE_LAUNCH),$(IMDPIPE)) extract-audio --cache $(CACHE) --model $(AUDIO_MODEL)
	$(IMDPIPE) build-savld --cache $(CACHE) $(SAVLD_OPTS)
	$(TRAIN) --cache $(CACHE) --out $(RUN) $(PAPER_TRAIN)
	$(IMDPIPE) evaluate --run-dir $(RUN) --cache $(CACHE) --split $(EVAL_SPLIT)

k400: setup _check_paths _preflight  ## DATA=videos under DATA (any depth) + K400_ANNOTATIONS csv files
	$(IMDPIPE) index $(DATA) --cache $(CACHE) $(foreach a,$(K400_ANNOTATIONS),--annotations $(a)) $(if $(K400_LABELS),--labels $(K400_LABELS))
	$(MAKE) --no-print-directory _stages EVAL_SPLIT=$(K400_EVAL_SPLIT)

ucf101: setup _check_paths _preflight  ## DATA=UCF-101 root with class folders, plus $(DATA)/ucfTrainTestlist
	$(IMDPIPE) index $(DATA) --cache $(CACHE) --splits $(DATA)/ucfTrainTestlist --split-id $(SPLIT) --labels ucf101
	$(MAKE) --no-print-directory _stages EVAL_SPLIT=test

hmdb51: setup _check_paths _preflight  ## DATA=HMDB51 root with class folders, plus $(DATA)/testTrainMulti_7030_splits
	$(IMDPIPE) index $(DATA) --cache $(CACHE) --splits $(DATA)/testTrainMulti_7030_splits --split-id $(SPLIT) --labels hmdb51
	$(MAKE) --no-print-directory _stages EVAL_SPLIT=test
