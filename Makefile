# Skin lesion classification: `make all` runs the pipeline on real data, `make demo` on synthetic
# data, `make test` the tests. Each step is a file target, so a second run redoes nothing.
# The defaults are the reference model's recipe (models/reference/MODEL_CARD.md): HAM10000 with ISIC
# 2017's training images beside it (two clinics; validation and thresholds on HAM10000's val split),
# the whole image with Shades of Gray (the U-Net's outline is drawn, not cropped to),
# EfficientNet-Lite0 with metadata, 10 epochs at 160 px, thresholds chosen on test-time-augmented
# validation probabilities. The first study's recipe: DATA=ham10000 COLLECTIONS= SEGMENTER=classical
# COLOUR=none CROP_FIT=inside METADATA=off TTA=off INPUT_SIZE=224.
# Override any variable on the command line: make all DATA=hamfull FROM_DIR=../shared/data/ham10000_full
# Several sources make one dataset: make all DATA=ham+isic2017 FROM_DIR="../shared/data/ham10000_full ../shared/data/isic2017"

DATA          ?= ham+isic2017
SOURCE        ?= isic
# the ISIC Archive collections a download takes (SOURCE=isic; none: HAM10000's release alone)
COLLECTIONS   ?= --collection HAM10000 --collection "Challenge 2017: Training"
FROM_DIR      ?=
SYNTHETIC_N   ?= 1500
ARCH          ?= efficientnet_lite0
# joint: one network for both answers (the malignancy network, a 7-class probe on it, both fine-tuned
# together: three trainings); binary: the malignancy network alone
TASK          ?= joint
EPOCHS        ?= 10
PROBE_EPOCHS  ?= 10
JOINT_EPOCHS  ?= 4
JOINT_LR      ?= 3e-5
# two sizes: the cache's square images (preprocess.py --cache-size) and the network's input, to which
# they are resized (train.py --input-size); IMG_SIZE and TRAIN_SIZE, their names before, still work
CACHE_SIZE    ?= $(or $(IMG_SIZE),224)
INPUT_SIZE    ?= $(or $(TRAIN_SIZE),160)
BATCH_SIZE    ?= 32
LR            ?= 1e-3
LOSS          ?= wbce
AUG           ?= full
INPUT         ?= full
HAIR          ?= on
SEGMENTER     ?= unet
COLOUR        ?= shades_of_gray
CROP_FIT      ?= pad
METADATA      ?= on
TTA           ?= on
TARGET_RECALL ?= 0.90
TRAIN_FLAGS   ?=
FETCH_FLAGS   ?=
TEST_SOURCE   ?=
MEMBERS       ?=
SHARED        ?= ../shared/data
RUN           ?= $(DATA)_$(ARCH)
REFERENCE     := models/reference
REFERENCE_ONNX := cache/onnx/$(REFERENCE)/onnx.json
EXPORT_DIR    ?= models/$(RUN)
IMAGES        ?=
MODEL         ?=
CLINIC        ?=
PREDICT_OUT   ?= predictions

# By default a virtual environment is made and requirements.txt installed into it; PYTHON=python3
# (or any interpreter that already has the requirements) skips that.
VENV   := .venv
PYTHON ?= $(VENV)/bin/python
ifeq ($(PYTHON),$(VENV)/bin/python)
PY_DEPS := $(VENV)/.installed
APP_DEPS := $(VENV)/.app-installed
endif

DATA_DIR := data/$(DATA)
# The segmenter learns two clinics' annotators: HAM10000's masks and ISIC 2018 Task 1's, each
# source half of every epoch's draws (docs/segmenter.md)
SEG_DATA    ?= ham+isic2018
SEG_FROM    ?= $(SHARED)/ham10000_full $(SHARED)/isic2018_task1
SEG_WEIGHTS ?= ham10000_full=1 isic2018_task1=1
SEG_EPOCHS  ?= 10
SEG_RUN    ?= runs/segmenter
# The first segmenter's recipe, HAM10000's masks alone: the second edition's and the shipped
# reference model's (make segmenter $(HAM_SEGMENTER) trains it again)
HAM_SEGMENTER := SEG_RUN=runs/segmenter_ham10000 SEG_DATA=hamfull SEG_FROM=$(SHARED)/ham10000_full SEG_WEIGHTS=
# The U-Net that segments: one `make segmenter` trained, else the reference model's
SEG_MODEL  ?= $(if $(wildcard $(SEG_RUN)/config.json),$(SEG_RUN)/model.pt,$(REFERENCE)/segmenter.pt)
# config.json is written when the segmenter's training ends (model.pt already after its first epoch)
SEG_DEPS   := $(if $(filter unet,$(SEGMENTER)),$(if $(filter $(SEG_RUN)/model.pt,$(SEG_MODEL)),$(SEG_RUN)/config.json,$(SEG_MODEL)))
# caches of another hair removal or segmenter than the default live beside it (preprocess.py's
# default names, preprocess.default_cache_dir: one rule, written here too because make needs the names
# when it reads its targets; a test holds the two equal)
CACHE_SUFFIX := $(if $(filter on,$(HAIR)),,_hair-$(HAIR))$(if $(filter unet,$(SEGMENTER)),_unet)$(if \
	$(filter shades_of_gray,$(COLOUR)),_sog)$(if $(filter pad,$(CROP_FIT)),_pad)
CACHE    := cache/$(DATA)_$(CACHE_SIZE)$(CACHE_SUFFIX)
RUN_DIR  := runs/$(RUN)

ifeq ($(DATA),synthetic)
FETCH_FROM := --synthetic $(SYNTHETIC_N)
else ifneq ($(FROM_DIR),)
FETCH_FROM := --from-dir $(FROM_DIR)
else
FETCH_FROM := --source $(SOURCE) $(if $(filter isic,$(SOURCE)),$(COLLECTIONS))
endif

.PHONY: setup all data preprocess segmenter train threshold validate evaluate export predict app app-deps reference-bench reference-test site-bench segmenter-bench source-test external external-val demo test \
	bench clean distclean help

all: $(RUN_DIR)/metrics.csv  ## data -> preprocess -> train -> threshold -> evaluate

data: $(DATA_DIR)/metadata.csv  ## fetch or import DATA into data/DATA
preprocess: $(CACHE)/index.csv  ## hair removal, segmentation, crops into cache/DATA_CACHE_SIZE
train: $(RUN_DIR)/val_probs.csv  ## train ARCH into runs/RUN (with MEMBERS: their ensemble)
threshold: $(RUN_DIR)/thresholds.json  ## choose operating points on validation
validate: $(RUN_DIR)/val/metrics.csv  ## validation metrics and plots into runs/RUN/val (reads no test image)
evaluate: $(RUN_DIR)/metrics.csv  ## test-split metrics and plots (per source too, for a dataset of several)

setup: | $(PY_DEPS) $(REFERENCE_ONNX)  ## create .venv, install requirements.txt, write the reference model's ONNX files

# The reference model's networks as ONNX files, what predict.py and the page run on ONNX Runtime: made
# on each machine from the committed weights, outside the folder (which holds its weights once, within
# 25 MB; common.onnx_dir finds them), each checked against PyTorch before it is written (its figures
# in onnx.json)
$(REFERENCE_ONNX): $(REFERENCE)/model.pt $(wildcard $(REFERENCE)/classes.pt $(REFERENCE)/segmenter.pt) | $(PY_DEPS)
	$(PYTHON) export_model.py --onnx $(REFERENCE) --onnx-out $(dir $@)

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

$(DATA_DIR)/metadata.csv: | $(PY_DEPS)
	$(PYTHON) fetch_data.py $(FETCH_FROM) --out $(DATA_DIR) $(FETCH_FLAGS)

cache/%_$(CACHE_SIZE)$(CACHE_SUFFIX)/index.csv: data/%/metadata.csv $(SEG_DEPS) | $(PY_DEPS)
	$(PYTHON) preprocess.py --data data/$* --cache-size $(CACHE_SIZE) --hair-removal $(HAIR) --colour-constancy $(COLOUR) \
		--crop-fit $(CROP_FIT) $(if $(SEG_DEPS),--segmenter unet --segmenter-model $(SEG_MODEL)) --out cache/$*_$(CACHE_SIZE)$(CACHE_SUFFIX)

# The learned segmenter (SEGMENTER=unet): a U-Net trained on the train split of SEG_DATA's expert
# masks, its epoch and mask threshold chosen on the val split of each source (train_segmenter.py).
segmenter: $(SEG_RUN)/config.json  ## train the U-Net lesion segmenter on ham10000_full's and isic2018_task1's masks (make all then uses it)

$(SEG_RUN)/config.json: | $(PY_DEPS)
	$(MAKE) data/$(SEG_DATA)/metadata.csv DATA=$(SEG_DATA) FROM_DIR="$(SEG_FROM)"
	$(PYTHON) train_segmenter.py --data data/$(SEG_DATA) --run-dir $(SEG_RUN) --epochs $(SEG_EPOCHS) \
		$(foreach weight,$(SEG_WEIGHTS),--source-weight $(weight)) $(if $(wildcard $(SEG_RUN)/last.pt),--resume)

# train_run: train.py into run folder $(1) with the flags $(2) beside the shared ones; val_probs.csv is
# written when training ends (model.pt already after the first epoch), so an interrupted run is not
# taken for a finished one; it resumes from its last.pt.
train_run = $(PYTHON) train.py --cache $(CACHE) --run-dir $(1) --arch $(ARCH) --batch-size $(BATCH_SIZE) --aug $(AUG) \
	--input $(INPUT) --input-size $(INPUT_SIZE) $(if $(filter on,$(METADATA)),--metadata) $(2) $(TRAIN_FLAGS) \
	$(if $(wildcard $(1)/last.pt),--resume)
# the malignancy network's own flags: TASK=binary's run and TASK=joint's first training
MALIGNANCY_FLAGS = --epochs $(EPOCHS) --lr $(LR) --loss $(LOSS)
ifneq ($(MEMBERS),)
# MEMBERS="a b c" (run names, as RUN): runs/RUN is their ensemble instead of a model of its own.
$(RUN_DIR)/val_probs.csv: $(foreach m,$(MEMBERS),runs/$(m)/val_probs.csv) | $(PY_DEPS)
	$(PYTHON) ensemble.py --run-dir $(RUN_DIR) $(addprefix runs/,$(MEMBERS))
else ifeq ($(TASK),binary)
$(RUN_DIR)/val_probs.csv: $(CACHE)/index.csv | $(PY_DEPS)
	$(call train_run,$(RUN_DIR),$(MALIGNANCY_FLAGS))
else
# TASK=joint, one network for both answers in three trainings (docs/fourth_edition.md, arm JLP3): the
# malignancy network (TASK=binary's run, into runs/RUN_malignancy), a 7-class head on it frozen (the
# linear probe, runs/RUN_probe), then both heads and the network fine-tuned together from those two
$(RUN_DIR)_malignancy/val_probs.csv: $(CACHE)/index.csv | $(PY_DEPS)
	$(call train_run,$(RUN_DIR)_malignancy,$(MALIGNANCY_FLAGS))
$(RUN_DIR)_probe/val_probs.csv: $(RUN_DIR)_malignancy/val_probs.csv | $(PY_DEPS)
	$(call train_run,$(RUN_DIR)_probe,--task multiclass --loss ce --class-weights balanced --epochs $(PROBE_EPOCHS) \
		--lr $(LR) --frozen-from $(RUN_DIR)_malignancy/model.pt)
$(RUN_DIR)/val_probs.csv: $(RUN_DIR)_probe/val_probs.csv | $(PY_DEPS)
	$(call train_run,$(RUN_DIR),--task joint --loss $(LOSS) --class-weights balanced --epochs $(JOINT_EPOCHS) \
		--lr $(JOINT_LR) --init-from $(RUN_DIR)_malignancy/model.pt --init-head $(RUN_DIR)_probe/model.pt)
endif

ifeq ($(TTA),on)
# Thresholds chosen on test-time-augmented validation probabilities, the way evaluate.py and
# predict.py then read images. evaluate.py needs thresholds to run, so plain ones come first.
$(RUN_DIR)/val_tta/test_probs.csv: $(RUN_DIR)/val_probs.csv | $(PY_DEPS)
	$(PYTHON) threshold.py --run $(RUN_DIR) --target-recall $(TARGET_RECALL)
	$(PYTHON) evaluate.py --run $(RUN_DIR) --split val --tta --out-dir $(RUN_DIR)/val_tta

$(RUN_DIR)/thresholds.json: $(RUN_DIR)/val_tta/test_probs.csv | $(PY_DEPS)
	$(PYTHON) threshold.py --run $(RUN_DIR) --target-recall $(TARGET_RECALL) --probs $<
else
$(RUN_DIR)/thresholds.json: $(RUN_DIR)/val_probs.csv | $(PY_DEPS)
	$(PYTHON) threshold.py --run $(RUN_DIR) --target-recall $(TARGET_RECALL)
endif

export: $(RUN_DIR)/thresholds.json | $(PY_DEPS)  ## compact fp16 copy of runs/RUN for predict.py --run, into EXPORT_DIR (models/RUN)
	$(PYTHON) export_model.py --run $(RUN_DIR) --out $(EXPORT_DIR) $(if $(filter $(REFERENCE),$(EXPORT_DIR)),--onnx-out \
		$(dir $(REFERENCE_ONNX)))

predict: | $(PY_DEPS) $(REFERENCE_ONNX)  ## classify IMAGES="files or folders" with the reference model (or MODEL=folder) into PREDICT_OUT
	$(if $(IMAGES),,$(error predict needs IMAGES="image files or folders"))
	$(PYTHON) predict.py $(IMAGES) $(if $(MODEL),--run $(MODEL)) --out $(PREDICT_OUT)/predictions.csv \
		--overlay $(PREDICT_OUT)

# The web page's optional requirements (Gradio; Selenium for its browser test), beside the core ones
$(VENV)/.app-installed: requirements-app.txt | $(PY_DEPS)
	$(VENV)/bin/pip install --quiet -r requirements-app.txt
	touch $@
app: | $(APP_DEPS) $(REFERENCE_ONNX)  ## serve the web page at http://127.0.0.1:7860 with the reference model (or MODEL=folder, CLINIC=name)
	$(PYTHON) app.py $(if $(MODEL),--run $(MODEL)) $(if $(CLINIC),--clinic $(CLINIC))
# Chromium for the page's browser test: Debian's packages where apt-get can install them, else the
# test is skipped and says why
app-deps: | $(APP_DEPS)  ## the web page's optional requirements, and headless Chromium for its test (Debian, as root)
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q chromium chromium-driver >/dev/null || \
		(apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null) || \
		echo "Chromium could not be installed: the page's browser test will be skipped"; \
	else echo "Chromium not installed (it needs apt-get as root): the page's browser test will be skipped"; fi

$(RUN_DIR)/metrics.csv: $(RUN_DIR)/thresholds.json | $(PY_DEPS)
	$(PYTHON) evaluate.py --run $(RUN_DIR)

$(RUN_DIR)/val/metrics.csv: $(RUN_DIR)/thresholds.json | $(PY_DEPS)
	$(PYTHON) evaluate.py --run $(RUN_DIR) --split val --out-dir $(RUN_DIR)/val

source-test:  ## one source's test split alone (TEST_SOURCE=name) into runs/RUN/source_NAME
	$(if $(TEST_SOURCE),,$(error source-test needs TEST_SOURCE=name, a value of the dataset's source column))
	$(MAKE) $(RUN_DIR)/source_$(TEST_SOURCE)/metrics.csv

$(RUN_DIR)/source_%/metrics.csv: $(RUN_DIR)/thresholds.json | $(PY_DEPS)
	$(PYTHON) evaluate.py --run $(RUN_DIR) --source $* --out-dir $(RUN_DIR)/source_$*

# An external test set from another hospital and dermatoscope: every PH2 image is a test image.
external: $(RUN_DIR)/ph2/metrics.csv  ## evaluate RUN on PH2 (melanoma vs nevus) into runs/RUN/ph2

ifneq ($(DATA),ph2)
data/ph2/metadata.csv: | $(PY_DEPS)
	$(PYTHON) fetch_data.py --from-dir $(SHARED)/ph2 --out data/ph2 --assign-split test
endif

$(RUN_DIR)/ph2/metrics.csv: $(RUN_DIR)/thresholds.json cache/ph2_$(CACHE_SIZE)$(CACHE_SUFFIX)/index.csv | $(PY_DEPS)
	$(PYTHON) evaluate.py --run $(RUN_DIR) --cache cache/ph2_$(CACHE_SIZE)$(CACHE_SUFFIX) --split all --out-dir $(RUN_DIR)/ph2

# An external validation set, for choices about other clinics: ISIC 2017's train and val images
# (melanoma vs the rest). Its test images are left unread (--only-split): a study reads them once.
external-val: $(RUN_DIR)/isic2017_trainval/metrics.csv  ## evaluate RUN on ISIC 2017 train+val into runs/RUN/isic2017_trainval

data/isic2017_trainval/metadata.csv: | $(PY_DEPS)
	$(PYTHON) fetch_data.py --from-dir $(SHARED)/isic2017 --only-split train val --out data/isic2017_trainval --assign-split val

$(RUN_DIR)/isic2017_trainval/metrics.csv: $(RUN_DIR)/thresholds.json cache/isic2017_trainval_$(CACHE_SIZE)$(CACHE_SUFFIX)/index.csv | $(PY_DEPS)
	$(PYTHON) evaluate.py --run $(RUN_DIR) --cache cache/isic2017_trainval_$(CACHE_SIZE)$(CACHE_SUFFIX) --split all \
		--out-dir $(RUN_DIR)/isic2017_trainval

# The reference model (models/reference/MODEL_CARD.md): the fourth edition's JLP3, seed 1
# (docs/fourth_edition.md), one network for both answers. Retrained: make four-data, then make
# four-full FOUR_FULL_ARMS=JLP3 (runs/four_full/JLP3_s1; it starts from PREVIOUS_REFERENCE, studies.mk),
# then its TTA thresholds and make export RUN=four_full/JLP3_s1 EXPORT_DIR=models/reference (the card's
# exact commands). Checked and read through caches its own compact segmenter made; the full-precision
# run's folder holds the compact model's evaluations.
REF_RUN ?= runs/four_full/JLP3_s1
# a 7-class run exported beside it as classes.pt (empty: none; the shipped network gives both answers)
REF_CLASSES_RUN ?=
# the reference model's crop (model.pt's preprocess key; a test holds them equal)
REF_CROP_FIT ?= pad
ref_cache = $(PYTHON) preprocess.py --data data/$(1) --cache-size 224 --colour-constancy shades_of_gray --segmenter unet \
	--segmenter-model $(REFERENCE)/segmenter.pt --crop-fit $(REF_CROP_FIT) --out cache/$(1)_224_reference
reference-bench: | $(PY_DEPS) $(REFERENCE_ONNX)  ## the reference model against its full-precision run (validation), predict.py's speed
	$(MAKE) data/hamfull_valtest/metadata.csv
	$(call ref_cache,hamfull_valtest)
	$(PYTHON) evaluate.py --run $(REFERENCE) --cache cache/hamfull_valtest_224_reference --split val \
		--out-dir $(REF_RUN)/compact_val
	$(PYTHON) bench/reference_model.py --full-probs $(REF_RUN)/val_tta/test_probs.csv \
		--compact-probs $(REF_RUN)/compact_val/test_probs.csv \
		--full-class-probs $(or $(REF_CLASSES_RUN),$(REF_RUN))/val_tta/test_probs.csv \
		--out bench/results/reference_faithful
	$(PYTHON) bench/reference_model.py --speed --n 500 --out bench/results/reference_speed

# ham10000_full's val and test rows alone: the same split as all of it (drawn from the labels alone)
data/hamfull_valtest/metadata.csv: | $(PY_DEPS)
	$(PYTHON) fetch_data.py --from-dir $(SHARED)/ham10000_full --only-split val test --out data/hamfull_valtest

data/isic2017_val/metadata.csv: | $(PY_DEPS)
	$(PYTHON) fetch_data.py --from-dir $(SHARED)/isic2017 --only-split val --out data/isic2017_val

# Site calibration measured (calibrate.py): a copy of the reference model calibrated to ISIC 2017's
# val images (their age and sex hidden: its test images have none), then PH2 two-fold and ISIC
# 2017 val -> test from the probabilities make reference-test wrote
SITES_RUN := runs/reference_sites
site-bench: | $(PY_DEPS)  ## site calibration on PH2 (two-fold) and ISIC 2017 (val -> test), after reference-test
	$(MAKE) data/isic2017_val/metadata.csv
	rm -rf $(SITES_RUN) && mkdir -p runs && cp -r $(REFERENCE) $(SITES_RUN)
	$(PYTHON) calibrate.py --run $(SITES_RUN) --data data/isic2017_val --name isic2017_val --hide-metadata
	$(PYTHON) bench/site_calibration.py --ham-thresholds $(REFERENCE)/thresholds.json \
		--ph2 $(REF_RUN)/compact_ph2/test_probs.csv --isic-val $(SITES_RUN)/clinics/isic2017_val/site_probs.csv \
		--isic-test $(REF_RUN)/compact_isic2017_test/test_probs.csv --out bench/results/site_calibration

data/isic2017_test/metadata.csv: | $(PY_DEPS)
	$(PYTHON) fetch_data.py --from-dir $(SHARED)/isic2017 --only-split test --out data/isic2017_test

data/bcn20000_test/metadata.csv: | $(PY_DEPS)
	$(PYTHON) fetch_data.py --from-dir $(SHARED)/bcn20000_84 --only-split test --out data/bcn20000_test

reference-test: | $(PY_DEPS)  ## read the HAM10000, ISIC 2017 and BCN20000 test splits and PH2 with the reference model, for its card
	$(MAKE) data/hamfull_valtest/metadata.csv data/isic2017_test/metadata.csv data/bcn20000_test/metadata.csv \
		data/ph2/metadata.csv
	$(call ref_cache,hamfull_valtest)
	$(call ref_cache,isic2017_test)
	$(call ref_cache,bcn20000_test)
	$(call ref_cache,ph2)
	$(PYTHON) evaluate.py --run $(REFERENCE) --cache cache/hamfull_valtest_224_reference \
		--out-dir $(REF_RUN)/compact_ham10000_test
	$(PYTHON) evaluate.py --run $(REFERENCE) --cache cache/isic2017_test_224_reference --split test \
		--out-dir $(REF_RUN)/compact_isic2017_test
	$(PYTHON) evaluate.py --run $(REFERENCE) --cache cache/bcn20000_test_224_reference --split test \
		--out-dir $(REF_RUN)/compact_bcn20000_test
	$(PYTHON) evaluate.py --run $(REFERENCE) --cache cache/ph2_224_reference --split all --out-dir $(REF_RUN)/compact_ph2
	$(PYTHON) bench/study2.py --read "$(REF_RUN)/compact_ham10000_test:HAM10000 test" \
		"$(REF_RUN)/compact_isic2017_test:ISIC 2017 test" "$(REF_RUN)/compact_bcn20000_test:BCN20000 test" \
		"$(REF_RUN)/compact_ph2:PH2" \
		--out bench/results/reference_test --plots docs/results/reference

# fp32: at 64 px bf16 autocast trains slower on a CPU than fp32 (17 s an epoch against 10 here)
demo:  ## the whole pipeline on synthetic images, under 2 minutes on 2 CPU cores
	$(MAKE) all DATA=synthetic SYNTHETIC_N=1000 RUN=demo CACHE_SIZE=64 INPUT_SIZE=64 EPOCHS=4 PROBE_EPOCHS=2 JOINT_EPOCHS=2 \
		JOINT_LR=2e-4 ARCH=efficientnet_lite0 BATCH_SIZE=32 LR=2e-3 TRAIN_FLAGS="--precision fp32"

test: | $(PY_DEPS) $(REFERENCE_ONNX)  ## run the test suite (the reference model as make setup leaves it: with its ONNX files)
	$(PYTHON) -m pytest -q tests

bench: | $(PY_DEPS) $(REFERENCE_ONNX)  ## benchmarks on the real images in SHARED (about an hour with the segmenter's training; results under cache/ and bench/results/)
	$(PYTHON) fetch_data.py --from-dir $(SHARED)/ham10000_full --out data/hamfull
	$(PYTHON) preprocess.py --data data/hamfull --cache-size 224
	$(PYTHON) fetch_data.py --from-dir $(SHARED)/ph2 --out data/ph2 --assign-split test
	$(PYTHON) preprocess.py --data data/ph2 --score-masks $(SHARED)/ph2/masks
	$(PYTHON) fetch_data.py --from-dir $(SHARED)/ham10000_224 --out data/ham224
	$(PYTHON) preprocess.py --data data/ham224 --overlay-sheet 50
	$(PYTHON) bench/hair_removal.py --shared $(SHARED) --out bench/results/hair_removal
	$(PYTHON) bench/preprocess_speed.py --n 500 --workers 2 --out bench/results/preprocess_speed.json
	$(PYTHON) bench/train_speed.py --cache cache/ham224_224 --input-size 224 --out bench/results/train_speed.json
	$(PYTHON) bench/engine_speed.py --model $(REFERENCE) --n 500 --out bench/results/engine_speed
	$(MAKE) segmenter-bench

# The segmenters side by side on expert masks (docs/segmenter.md): the classical recipe, the
# reference model's U-Net (HAM10000's masks alone) and make segmenter's (two sources), per source
# on the val splits that chose it, then on ham10000_full's test split and PH2.
# unet_caches: both U-Nets' caches of data/$(1), with further preprocess.py flags $(2) and a name suffix $(3)
unet_caches = $(PYTHON) preprocess.py --data data/$(1) --cache-size 224 --segmenter unet --segmenter-model $(REFERENCE)/segmenter.pt \
		$(2) --out cache/$(1)_224_unet_reference$(3) && \
	$(PYTHON) preprocess.py --data data/$(1) --cache-size 224 --segmenter unet --segmenter-model $(SEG_RUN)/model.pt \
		$(2) --out cache/$(1)_224_unet$(3)
seg_caches = $(PYTHON) preprocess.py --data data/$(1) --cache-size 224 --out cache/$(1)_224 && $(call unet_caches,$(1))
seg_bench = $(PYTHON) bench/segmenter.py --data data/$(1) --cache classical=cache/$(1)_224 \
	--cache unet_ham10000=cache/$(1)_224_unet_reference --cache unet_two_sources=cache/$(1)_224_unet
segmenter-bench: $(SEG_RUN)/config.json | $(PY_DEPS)  ## classical, reference and make segmenter's masks side by side (bench/results/segmenter)
	$(PYTHON) fetch_data.py --from-dir $(SHARED)/ph2 --out data/ph2 --assign-split test
	$(call seg_caches,$(SEG_DATA))
	$(call seg_caches,ph2)
	$(call seg_bench,$(SEG_DATA)) --split val --name val
	$(call seg_bench,$(SEG_DATA)) --split test --name hamfull_test --model $(SEG_RUN)/model.pt
	$(call seg_bench,ph2) --name ph2

clean:  ## remove caches, runs and synthetic data (keeps downloaded data and the venv)
	rm -rf cache runs data/synthetic

distclean: clean  ## also remove all data and the virtual environment
	rm -rf data $(VENV)

list_targets = grep -E '^[a-z0-9-]+:.*\#\# ' $(1) | sed -E 's/^([a-z0-9-]+):.*\#\# (.*)/  \1\t\2/' | expand -t 18
help:  ## list targets and variables
	@echo "targets:"
	@$(call list_targets,Makefile)
	@echo "studies (studies.mk; their write-ups in docs/):"
	@$(call list_targets,studies.mk)
	@echo "variables (current value):"
	@$(foreach v,DATA SOURCE COLLECTIONS FROM_DIR SYNTHETIC_N ARCH TASK EPOCHS PROBE_EPOCHS JOINT_EPOCHS JOINT_LR CACHE_SIZE INPUT_SIZE BATCH_SIZE LR LOSS AUG INPUT \
		HAIR SEGMENTER SEG_RUN SEG_MODEL COLOUR CROP_FIT METADATA TTA TARGET_RECALL FETCH_FLAGS TRAIN_FLAGS TEST_SOURCE MEMBERS \
		SHARED RUN EXPORT_DIR IMAGES MODEL CLINIC PREDICT_OUT PYTHON,printf '  %-14s %s\n' '$(v)' '$($(v))';)

include studies.mk
