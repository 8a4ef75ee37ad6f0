# Skin lesion classification: `make all` runs the pipeline on real data, `make demo` on synthetic
# data, `make test` the tests. Each step is a file target, so a second run redoes nothing.
# Override any variable on the command line: make all DATA=ham224 FROM_DIR=../shared/data/ham10000_224

DATA          ?= ham10000
SOURCE        ?= isic
FROM_DIR      ?=
SYNTHETIC_N   ?= 1500
ARCH          ?= efficientnet_lite0
EPOCHS        ?= 10
IMG_SIZE      ?= 224
BATCH_SIZE    ?= 32
LR            ?= 1e-3
LOSS          ?= wbce
AUG           ?= full
INPUT         ?= full
TARGET_RECALL ?= 0.90
TRAIN_FLAGS   ?=
SHARED        ?= ../shared/data
RUN           ?= $(DATA)_$(ARCH)

# By default a virtual environment is made and requirements.txt installed into it; PYTHON=python3
# (or any interpreter that already has the requirements) skips that.
VENV   := .venv
PYTHON ?= $(VENV)/bin/python
ifeq ($(PYTHON),$(VENV)/bin/python)
PY_DEPS := $(VENV)/.installed
endif

DATA_DIR := data/$(DATA)
CACHE    := cache/$(DATA)_$(IMG_SIZE)
RUN_DIR  := runs/$(RUN)

ifeq ($(DATA),synthetic)
FETCH_FROM := --synthetic $(SYNTHETIC_N)
else ifneq ($(FROM_DIR),)
FETCH_FROM := --from-dir $(FROM_DIR)
else
FETCH_FROM := --source $(SOURCE)
endif

.PHONY: all data preprocess train threshold evaluate demo test bench clean distclean help

all: $(RUN_DIR)/metrics.csv  ## data -> preprocess -> train -> threshold -> evaluate

data: $(DATA_DIR)/metadata.csv  ## fetch or import DATA into data/DATA
preprocess: $(CACHE)/index.csv  ## hair removal, segmentation, crops into cache/DATA_IMG_SIZE
train: $(RUN_DIR)/model.pt  ## train ARCH into runs/RUN
threshold: $(RUN_DIR)/thresholds.json  ## choose operating points on validation
evaluate: $(RUN_DIR)/metrics.csv  ## test-split metrics and plots

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

$(DATA_DIR)/metadata.csv: | $(PY_DEPS)
	$(PYTHON) fetch_data.py $(FETCH_FROM) --out $(DATA_DIR)

$(CACHE)/index.csv: $(DATA_DIR)/metadata.csv | $(PY_DEPS)
	$(PYTHON) preprocess.py --data $(DATA_DIR) --img-size $(IMG_SIZE) --out $(CACHE)

$(RUN_DIR)/model.pt: $(CACHE)/index.csv | $(PY_DEPS)
	$(PYTHON) train.py --cache $(CACHE) --run-dir $(RUN_DIR) --arch $(ARCH) --epochs $(EPOCHS) \
		--batch-size $(BATCH_SIZE) --lr $(LR) --loss $(LOSS) --aug $(AUG) --input $(INPUT) $(TRAIN_FLAGS)

$(RUN_DIR)/thresholds.json: $(RUN_DIR)/model.pt | $(PY_DEPS)
	$(PYTHON) threshold.py --run $(RUN_DIR) --target-recall $(TARGET_RECALL)

$(RUN_DIR)/metrics.csv: $(RUN_DIR)/thresholds.json | $(PY_DEPS)
	$(PYTHON) evaluate.py --run $(RUN_DIR)

demo:  ## the whole pipeline on synthetic images, a few minutes on 2 CPU cores
	$(MAKE) all DATA=synthetic RUN=demo IMG_SIZE=64 EPOCHS=8 ARCH=efficientnet_lite0 BATCH_SIZE=32 LR=2e-3

test: | $(PY_DEPS)  ## run the test suite
	$(PYTHON) -m pytest -q tests

bench: | $(PY_DEPS)  ## benchmarks on the real images in SHARED (minutes; results under cache/ and bench/results/)
	$(PYTHON) fetch_data.py --from-dir $(SHARED)/ph2 --out data/ph2 --assign-split test
	$(PYTHON) preprocess.py --data data/ph2 --score-masks $(SHARED)/ph2/masks
	$(PYTHON) fetch_data.py --from-dir $(SHARED)/ham10000_224 --out data/ham224
	$(PYTHON) preprocess.py --data data/ham224 --overlay-sheet 50
	$(PYTHON) bench/preprocess_speed.py --n 500 --workers 2 --out bench/results/preprocess_speed.json

clean:  ## remove caches, runs and synthetic data (keeps downloaded data and the venv)
	rm -rf cache runs data/synthetic

distclean: clean  ## also remove all data and the virtual environment
	rm -rf data $(VENV)

help:  ## list targets and variables
	@echo "targets:"
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z]+):.*## (.*)/  \1\t\2/' | expand -t 14
	@echo "variables (current value):"
	@$(foreach v,DATA SOURCE FROM_DIR SYNTHETIC_N ARCH EPOCHS IMG_SIZE BATCH_SIZE LR LOSS AUG INPUT \
		TARGET_RECALL TRAIN_FLAGS SHARED RUN PYTHON,printf '  %-14s %s\n' '$(v)' '$($(v))';)
