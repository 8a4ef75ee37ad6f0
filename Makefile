# Skin lesion classification: `make all` runs the pipeline on real data, `make demo` on synthetic
# data, `make test` the tests. Each step is a file target, so a second run redoes nothing.
# The defaults are the reference model's recipe (models/reference/MODEL_CARD.md): the U-Net lesion
# crop with Shades of Gray, EfficientNet-Lite0 with metadata, 10 epochs at 160 px, thresholds chosen
# on test-time-augmented validation probabilities. The first study's recipe: SEGMENTER=classical
# COLOUR=none INPUT=full METADATA=off TTA=off TRAIN_SIZE=224.
# Override any variable on the command line: make all DATA=hamfull FROM_DIR=../shared/data/ham10000_full
# Several sources make one dataset: make all DATA=ham+isic2017 FROM_DIR="../shared/data/ham10000_full ../shared/data/isic2017"

DATA          ?= ham10000
SOURCE        ?= isic
FROM_DIR      ?=
SYNTHETIC_N   ?= 1500
ARCH          ?= efficientnet_lite0
EPOCHS        ?= 10
IMG_SIZE      ?= 224
TRAIN_SIZE    ?= 160
BATCH_SIZE    ?= 32
LR            ?= 1e-3
LOSS          ?= wbce
AUG           ?= full
INPUT         ?= crop
HAIR          ?= on
SEGMENTER     ?= unet
COLOUR        ?= shades_of_gray
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
EXPORT_DIR    ?= models/$(RUN)
IMAGES        ?=
MODEL         ?=
PREDICT_OUT   ?= predictions

# By default a virtual environment is made and requirements.txt installed into it; PYTHON=python3
# (or any interpreter that already has the requirements) skips that.
VENV   := .venv
PYTHON ?= $(VENV)/bin/python
ifeq ($(PYTHON),$(VENV)/bin/python)
PY_DEPS := $(VENV)/.installed
endif

DATA_DIR := data/$(DATA)
# The segmenter learns two clinics' annotators: HAM10000's masks and ISIC 2018 Task 1's, each
# source half of every epoch's draws (docs/segmenter.md)
SEG_DATA    ?= ham+isic2018
SEG_FROM    ?= $(SHARED)/ham10000_full $(SHARED)/isic2018_task1
SEG_WEIGHTS ?= ham10000_full=1 isic2018_task1=1
SEG_EPOCHS  ?= 10
SEG_RUN    ?= runs/segmenter
# The U-Net that segments: one `make segmenter` trained, else the reference model's
SEG_MODEL  ?= $(if $(wildcard $(SEG_RUN)/config.json),$(SEG_RUN)/model.pt,$(REFERENCE)/segmenter.pt)
# config.json is written when the segmenter's training ends (model.pt already after its first epoch)
SEG_DEPS   := $(if $(filter unet,$(SEGMENTER)),$(if $(filter $(SEG_RUN)/model.pt,$(SEG_MODEL)),$(SEG_RUN)/config.json,$(SEG_MODEL)))
# caches of another hair removal or segmenter than the default live beside it (preprocess.py's
# default names)
CACHE_SUFFIX := $(if $(filter on,$(HAIR)),,_hair-$(HAIR))$(if $(filter unet,$(SEGMENTER)),_unet)$(if \
	$(filter shades_of_gray,$(COLOUR)),_sog)
CACHE    := cache/$(DATA)_$(IMG_SIZE)$(CACHE_SUFFIX)
RUN_DIR  := runs/$(RUN)

ifeq ($(DATA),synthetic)
FETCH_FROM := --synthetic $(SYNTHETIC_N)
else ifneq ($(FROM_DIR),)
FETCH_FROM := --from-dir $(FROM_DIR)
else
FETCH_FROM := --source $(SOURCE)
endif

.PHONY: setup all data preprocess segmenter train threshold validate evaluate export predict reference-bench reference-test site-bench source-test external external-val study study2-screen study2-levers study2-final study2-tta study2-test hair-study demo test \
	bench clean distclean help

all: $(RUN_DIR)/metrics.csv  ## data -> preprocess -> train -> threshold -> evaluate

data: $(DATA_DIR)/metadata.csv  ## fetch or import DATA into data/DATA
preprocess: $(CACHE)/index.csv  ## hair removal, segmentation, crops into cache/DATA_IMG_SIZE
train: $(RUN_DIR)/val_probs.csv  ## train ARCH into runs/RUN (with MEMBERS: their ensemble)
threshold: $(RUN_DIR)/thresholds.json  ## choose operating points on validation
validate: $(RUN_DIR)/val/metrics.csv  ## validation metrics and plots into runs/RUN/val (reads no test image)
evaluate: $(RUN_DIR)/metrics.csv  ## test-split metrics and plots (per source too, for a dataset of several)

setup: | $(PY_DEPS)  ## create .venv and install requirements.txt (every target that needs them does it too)

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

$(DATA_DIR)/metadata.csv: | $(PY_DEPS)
	$(PYTHON) fetch_data.py $(FETCH_FROM) --out $(DATA_DIR) $(FETCH_FLAGS)

cache/%_$(IMG_SIZE)$(CACHE_SUFFIX)/index.csv: data/%/metadata.csv $(SEG_DEPS) | $(PY_DEPS)
	$(PYTHON) preprocess.py --data data/$* --img-size $(IMG_SIZE) --hair-removal $(HAIR) --colour-constancy $(COLOUR) \
		$(if $(SEG_DEPS),--segmenter unet --segmenter-model $(SEG_MODEL)) --out cache/$*_$(IMG_SIZE)$(CACHE_SUFFIX)

# The learned segmenter (SEGMENTER=unet): a U-Net trained on the train split of SEG_DATA's expert
# masks, its epoch and mask threshold chosen on the val split of each source (train_segmenter.py).
segmenter: $(SEG_RUN)/config.json  ## train the U-Net lesion segmenter on ham10000_full's and isic2018_task1's masks (make all then uses it)

$(SEG_RUN)/config.json: | $(PY_DEPS)
	$(MAKE) data/$(SEG_DATA)/metadata.csv DATA=$(SEG_DATA) FROM_DIR="$(SEG_FROM)"
	$(PYTHON) train_segmenter.py --data data/$(SEG_DATA) --run-dir $(SEG_RUN) --epochs $(SEG_EPOCHS) \
		$(foreach weight,$(SEG_WEIGHTS),--source-weight $(weight)) $(if $(wildcard $(SEG_RUN)/last.pt),--resume)

ifeq ($(MEMBERS),)
# val_probs.csv is written when training ends (model.pt already after the first epoch), so an
# interrupted run is not taken for a finished one; it resumes from its last.pt.
$(RUN_DIR)/val_probs.csv: $(CACHE)/index.csv | $(PY_DEPS)
	$(PYTHON) train.py --cache $(CACHE) --run-dir $(RUN_DIR) --arch $(ARCH) --epochs $(EPOCHS) \
		--batch-size $(BATCH_SIZE) --lr $(LR) --loss $(LOSS) --aug $(AUG) --input $(INPUT) --img-size $(TRAIN_SIZE) \
		$(if $(filter on,$(METADATA)),--metadata) $(TRAIN_FLAGS) $(if $(wildcard $(RUN_DIR)/last.pt),--resume)
else
# MEMBERS="a b c" (run names, as RUN): runs/RUN is their ensemble instead of a model of its own.
$(RUN_DIR)/val_probs.csv: $(foreach m,$(MEMBERS),runs/$(m)/val_probs.csv) | $(PY_DEPS)
	$(PYTHON) ensemble.py --run-dir $(RUN_DIR) $(addprefix runs/,$(MEMBERS))
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
	$(PYTHON) export_model.py --run $(RUN_DIR) --out $(EXPORT_DIR)

predict: | $(PY_DEPS)  ## classify IMAGES="files or folders" with the reference model (or MODEL=folder) into PREDICT_OUT
	$(if $(IMAGES),,$(error predict needs IMAGES="image files or folders"))
	$(PYTHON) predict.py $(IMAGES) $(if $(MODEL),--run $(MODEL)) --out $(PREDICT_OUT)/predictions.csv \
		--overlay $(PREDICT_OUT)

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

$(RUN_DIR)/ph2/metrics.csv: $(RUN_DIR)/thresholds.json cache/ph2_$(IMG_SIZE)$(CACHE_SUFFIX)/index.csv | $(PY_DEPS)
	$(PYTHON) evaluate.py --run $(RUN_DIR) --cache cache/ph2_$(IMG_SIZE)$(CACHE_SUFFIX) --split all --out-dir $(RUN_DIR)/ph2

# An external validation set, for choices about other clinics: ISIC 2017's train and val images
# (melanoma vs the rest). Its test images are left unread (--only-split): a study reads them once.
external-val: $(RUN_DIR)/isic2017_trainval/metrics.csv  ## evaluate RUN on ISIC 2017 train+val into runs/RUN/isic2017_trainval

data/isic2017_trainval/metadata.csv: | $(PY_DEPS)
	$(PYTHON) fetch_data.py --from-dir $(SHARED)/isic2017 --only-split train val --out data/isic2017_trainval --assign-split val

$(RUN_DIR)/isic2017_trainval/metrics.csv: $(RUN_DIR)/thresholds.json cache/isic2017_trainval_$(IMG_SIZE)$(CACHE_SUFFIX)/index.csv | $(PY_DEPS)
	$(PYTHON) evaluate.py --run $(RUN_DIR) --cache cache/isic2017_trainval_$(IMG_SIZE)$(CACHE_SUFFIX) --split all \
		--out-dir $(RUN_DIR)/isic2017_trainval

# The reference model (models/reference/MODEL_CARD.md). Retrained: make segmenter, then make
# threshold DATA=hamfull FROM_DIR=$(SHARED)/ham10000_full (the defaults' recipe), then make export
# DATA=hamfull EXPORT_DIR=models/reference. Checked and read through caches its own compact
# segmenter made; the full-precision run's folder holds the compact model's evaluations.
REF_RUN ?= runs/hamfull_efficientnet_lite0
ref_cache = $(PYTHON) preprocess.py --data data/$(1) --img-size 224 --colour-constancy shades_of_gray --segmenter unet \
	--segmenter-model $(REFERENCE)/segmenter.pt --out cache/$(1)_224_reference
reference-bench: | $(PY_DEPS)  ## the reference model against its full-precision run (validation), predict.py's speed
	$(MAKE) data/hamfull_valtest/metadata.csv
	$(call ref_cache,hamfull_valtest)
	$(PYTHON) evaluate.py --run $(REFERENCE) --cache cache/hamfull_valtest_224_reference --split val \
		--out-dir $(REF_RUN)/compact_val
	$(PYTHON) bench/reference_model.py --full-probs $(REF_RUN)/val_tta/test_probs.csv \
		--compact-probs $(REF_RUN)/compact_val/test_probs.csv --out bench/results/reference_faithful
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

reference-test: | $(PY_DEPS)  ## read the HAM10000 test split, ISIC 2017 test and PH2 with the reference model, for its card
	$(MAKE) data/hamfull_valtest/metadata.csv data/isic2017_test/metadata.csv data/ph2/metadata.csv
	$(call ref_cache,hamfull_valtest)
	$(call ref_cache,isic2017_test)
	$(call ref_cache,ph2)
	$(PYTHON) evaluate.py --run $(REFERENCE) --cache cache/hamfull_valtest_224_reference \
		--out-dir $(REF_RUN)/compact_ham10000_test
	$(PYTHON) evaluate.py --run $(REFERENCE) --cache cache/isic2017_test_224_reference --split test \
		--out-dir $(REF_RUN)/compact_isic2017_test
	$(PYTHON) evaluate.py --run $(REFERENCE) --cache cache/ph2_224_reference --split all --out-dir $(REF_RUN)/compact_ph2
	$(PYTHON) bench/study2.py --read "$(REF_RUN)/compact_ham10000_test:HAM10000 test" \
		"$(REF_RUN)/compact_isic2017_test:ISIC 2017 test" "$(REF_RUN)/compact_ph2:PH2" \
		--out bench/results/reference_test --plots docs/results/reference

# The study of README "Results": the reference study's stages, each a run of its own on the same
# lesion-level split and seed, evaluated on the internal test split and on PH2. Finished stages
# are not run again; an interrupted one resumes.
STUDY_DATA   ?= ham224
STUDY_FROM   ?= $(SHARED)/ham10000_224
STUDY_EPOCHS ?= 10
STUDY_TRAIN_SIZE ?= 160
STUDY_IMG_SIZE ?= 224
# The first study's caches were built with the legacy hair removal; its stages keep it, so that
# `make study` reproduces what README "Results" reports.
STUDY_HAIR   ?= legacy
# The first study's recipe where a stage does not set it: before the reference recipe's defaults
STUDY1_PINS := SEGMENTER=classical COLOUR=none METADATA=off TTA=off
# $(1) run folder under runs/, $(2) arch, $(3) loss, $(4) augmentation, $(5) input, $(6) training
# size, $(7) more train flags, $(8) more make variables and goals
recipe_run = $(MAKE) all external DATA=$(STUDY_DATA) FROM_DIR=$(STUDY_FROM) IMG_SIZE=$(STUDY_IMG_SIZE) EPOCHS=$(STUDY_EPOCHS) \
	RUN=$(1) ARCH=$(2) LOSS=$(3) AUG=$(4) INPUT=$(5) TRAIN_FLAGS="--img-size $(6) $(7)" $(STUDY1_PINS) $(8)
# $(1) run name, $(2) arch, $(3) loss, $(4) augmentation, $(5) input, $(6) training size, $(7) more flags
study_stage = $(call recipe_run,study/$(1),$(2),$(3),$(4),$(5),$(6),$(7),HAIR=$(STUDY_HAIR))
# $(1) run name, $(2) the member stages, whose mean probability it is
study_ensemble = $(MAKE) all external DATA=$(STUDY_DATA) FROM_DIR=$(STUDY_FROM) IMG_SIZE=$(STUDY_IMG_SIZE) \
	HAIR=$(STUDY_HAIR) RUN=study/$(1) MEMBERS="$(addprefix study/,$(2))" $(STUDY1_PINS)

# Stage 5 trains the recipe of stages 3-4 with the highest validation ROC-AUC again at the cache's
# full 224 px: full images (validation ROC-AUC 0.936, masked 0.916, crop 0.913 in our study run).
# bench/study.py then reports whichever binary run is best on validation at best_f1 and recall_target.
# Added after the first round, each choice made on validation: two more 7-class runs (6b a balanced
# sampler, 6c another seed) and their ensemble (9); the ensemble of the weighted-BCE runs of
# stages 2-5 (8: validation ROC-AUC 0.945 against 0.936 for the best run alone, 0.943 with stage 1
# too); stage 3's recipe for 30 epochs at Adam 3e-4 (10: the longer schedule, whose learning rate
# ranked first in a short validation-only trial on a GPU).
# Third round, planned before any of its runs was trained: the larger EfficientNet-Lite2 on stage 3's
# recipe at 160 px (11) and at 224 px (12), and the ensemble of every pretrained weighted-BCE binary
# run (13). The final system stays the binary run or ensemble with the highest validation ROC-AUC.
STUDY_BEST_INPUT ?= full
# the weighted-BCE stages 2-5, members of both ensembles 8 and 13
STUDY_WBCE_2_TO_5 = 2_wbce 3_wbce_aug 4a_wbce_aug_masked 4b_wbce_aug_crop 5_wbce_aug_$(STUDY_BEST_INPUT)_224
study: | $(PY_DEPS)  ## the reference study's stages on real images (hours on 2 CPU cores)
	$(call study_stage,1_baseline,efficientnet_lite0,ce,none,full,$(STUDY_TRAIN_SIZE),)
	$(call study_stage,2_wbce,efficientnet_lite0,wbce,none,full,$(STUDY_TRAIN_SIZE),)
	$(call study_stage,3_wbce_aug,efficientnet_lite0,wbce,full,full,$(STUDY_TRAIN_SIZE),)
	$(call study_stage,4a_wbce_aug_masked,efficientnet_lite0,wbce,full,masked,$(STUDY_TRAIN_SIZE),)
	$(call study_stage,4b_wbce_aug_crop,efficientnet_lite0,wbce,full,crop,$(STUDY_TRAIN_SIZE),)
	$(call study_stage,5_wbce_aug_$(STUDY_BEST_INPUT)_224,efficientnet_lite0,wbce,full,$(STUDY_BEST_INPUT),224,)
	$(call study_stage,6_multiclass,efficientnet_lite0,ce,full,full,$(STUDY_TRAIN_SIZE),--task multiclass --class-weights balanced)
	$(call study_stage,6b_multiclass_sampler,efficientnet_lite0,ce,full,full,$(STUDY_TRAIN_SIZE),--task multiclass --sampler balanced)
	$(call study_stage,6c_multiclass_seed1,efficientnet_lite0,ce,full,full,$(STUDY_TRAIN_SIZE),--task multiclass --class-weights balanced --seed 1)
	$(call study_stage,7_resnet18_scratch,resnet18,wbce,full,full,$(STUDY_TRAIN_SIZE),--no-pretrained)
	$(call study_ensemble,8_ensemble_wbce,$(STUDY_WBCE_2_TO_5))
	$(call study_ensemble,9_ensemble_multiclass,6_multiclass 6b_multiclass_sampler 6c_multiclass_seed1)
	$(call study_stage,10_wbce_aug_long,efficientnet_lite0,wbce,full,full,$(STUDY_TRAIN_SIZE),--epochs 30 --lr 3e-4)
	$(call study_stage,11_lite2_wbce_aug,efficientnet_lite2,wbce,full,full,$(STUDY_TRAIN_SIZE),)
	$(call study_stage,12_lite2_wbce_aug_224,efficientnet_lite2,wbce,full,full,224,)
	$(call study_ensemble,13_ensemble_all_wbce,$(STUDY_WBCE_2_TO_5) 10_wbce_aug_long 11_lite2_wbce_aug 12_lite2_wbce_aug_224)
	$(PYTHON) bench/study.py --runs runs/study --out bench/results/study --plots docs/results

# Study, second edition (README "Study, second edition: protocol"). Stage S screens levers cheaply
# on validation only: ham10000_full's val split and ISIC 2017 train+val (external validation); no
# test split and no PH2 image is read. $(1) arm name, $(2) input, $(3) segmenter, $(4) colour constancy
STUDY2_FROM ?= $(SHARED)/ham10000_full
# the segmenter the study trained (make segmenter), and each stage's own flags for the rest
STUDY2_PINS := SEG_MODEL=$(SEG_RUN)/model.pt METADATA=off TTA=off
screen_run = $(MAKE) validate external-val DATA=hamfull FROM_DIR=$(STUDY2_FROM) IMG_SIZE=224 EPOCHS=3 \
	RUN=study2/screen/$(1) ARCH=efficientnet_lite0 LOSS=wbce AUG=full INPUT=$(2) SEGMENTER=$(3) COLOUR=$(4) \
	TRAIN_FLAGS="--img-size 128 --seed 0" $(STUDY2_PINS)
STUDY2_SCREEN = S1_full S2_full_sog S3_crop_unet S4_crop_unet_sog
study2-screen: | $(PY_DEPS)  ## study, 2nd edition, stage S: levers screened on validation and ISIC 2017 train+val (about 25 min)
	$(call screen_run,S1_full,full,classical,none)
	$(call screen_run,S2_full_sog,full,classical,shades_of_gray)
	$(call screen_run,S3_crop_unet,crop,unet,none)
	$(call screen_run,S4_crop_unet_sog,crop,unet,shades_of_gray)
	$(PYTHON) bench/hair_study.py --runs $(addprefix runs/study2/screen/,$(STUDY2_SCREEN)) --out bench/results/study2_screen

# Stage T: the remaining levers, each one change to S4's recipe; T4 trains on a second source, so it
# is scored on ISIC 2017's val images (not its train ones) beside S4. $(1) arm, $(2) arch, $(3) loss,
# $(4) more train.py flags
STUDY2_S4 := runs/study2/screen/S4_crop_unet_sog
lever_run = $(MAKE) validate $(if $(5),,external-val) DATA=$(if $(5),ham+isic2017,hamfull) \
	FROM_DIR="$(STUDY2_FROM) $(5)" IMG_SIZE=224 EPOCHS=3 RUN=study2/levers/$(1) ARCH=$(2) LOSS=$(3) AUG=full \
	INPUT=crop SEGMENTER=unet COLOUR=shades_of_gray TRAIN_FLAGS="--img-size 128 --seed 0 $(4)" $(STUDY2_PINS)
isic2017_val = $(PYTHON) evaluate.py --run $(1) --cache cache/ham+isic2017_224_unet_sog --split val --source isic2017 \
	--out-dir $(1)/isic2017_val
STUDY2_LEVERS = T1_meta T2_lite1 T3_7class
study2-levers: | $(PY_DEPS)  ## study, 2nd edition, stage T: metadata, Lite1, 7-class trunk, second source (validation only)
	$(call lever_run,T1_meta,efficientnet_lite0,wbce,--metadata)
	$(call lever_run,T2_lite1,efficientnet_lite1,wbce)
	$(call lever_run,T3_7class,efficientnet_lite0,ce,--task multiclass --class-weights balanced)
	$(call lever_run,T4_isic_train,efficientnet_lite0,wbce,,$(SHARED)/isic2017)
	$(call isic2017_val,$(STUDY2_S4))
	$(call isic2017_val,runs/study2/levers/T4_isic_train)
	$(PYTHON) bench/hair_study.py --runs $(STUDY2_S4) $(addprefix runs/study2/levers/,$(STUDY2_LEVERS)) \
		--out bench/results/study2_levers
	$(PYTHON) bench/hair_study.py --runs $(STUDY2_S4) runs/study2/levers/T4_isic_train --out bench/results/study2_second_source

# Stage F: full length, S4's recipe with the levers stage T kept (README), 10 epochs at 160 px.
# F1 is the final system; F2 the same recipe with ISIC 2017 train as a second source; F3 the
# 7-class model. $(1) run, $(2) data, $(3) its folders, $(4) loss, $(5) more train.py flags
STUDY2_F       := runs/study2/final
STUDY2_F_ARCH  ?= efficientnet_lite0
STUDY2_F_FLAGS ?= --metadata
final_run = $(MAKE) validate $(if $(filter hamfull,$(2)),external-val) DATA=$(2) FROM_DIR="$(3)" IMG_SIZE=224 \
	EPOCHS=10 RUN=study2/final/$(1) ARCH=$(STUDY2_F_ARCH) LOSS=$(4) AUG=full INPUT=crop SEGMENTER=unet \
	COLOUR=shades_of_gray TRAIN_FLAGS="--img-size 160 --seed 0 $(STUDY2_F_FLAGS) $(5)" $(STUDY2_PINS)
study2-final: | $(PY_DEPS)  ## study, 2nd edition, stage F: the full-length runs (validation only; about 95 min on 2 cores)
	$(call final_run,F1,hamfull,$(STUDY2_FROM),wbce)
	$(call final_run,F2,ham+isic2017,$(STUDY2_FROM) $(SHARED)/isic2017,wbce)
	$(call final_run,F3_7class,hamfull,$(STUDY2_FROM),ce,--task multiclass --class-weights balanced)
	$(if $(STUDY2_TTA),$(MAKE) study2-tta)

# Test-time augmentation, used because it raised F1's validation ROC-AUC (README): each run's
# thresholds are then chosen on its own augmented validation probabilities
STUDY2_TTA ?= --tta
study2-tta: | $(PY_DEPS)  ## study, 2nd edition: augmented validation probabilities and thresholds of the F runs
	for run in F1 F2 F3_7class; do \
		$(PYTHON) evaluate.py --run $(STUDY2_F)/$$run --split val --tta --out-dir $(STUDY2_F)/$$run/val_tta && \
		$(PYTHON) threshold.py --run $(STUDY2_F)/$$run --probs $(STUDY2_F)/$$run/val_tta/test_probs.csv || exit 1; \
	done

# The single reading of the three test sets, by the final system committed in README beforehand
study2-test: | $(PY_DEPS)  ## study, 2nd edition: read the HAM10000 test split, ISIC 2017 test and PH2 once
	$(MAKE) data/isic2017/metadata.csv cache/isic2017_224_unet_sog/index.csv cache/ph2_224_unet_sog/index.csv \
		DATA=isic2017 FROM_DIR=$(SHARED)/isic2017 SEGMENTER=unet COLOUR=shades_of_gray $(STUDY2_PINS)
	$(PYTHON) evaluate.py --run $(STUDY2_F)/F1 $(STUDY2_TTA)
	$(PYTHON) evaluate.py --run $(STUDY2_F)/F1 --cache cache/isic2017_224_unet_sog --split test \
		--out-dir $(STUDY2_F)/F1/isic2017_test $(STUDY2_TTA)
	$(PYTHON) evaluate.py --run $(STUDY2_F)/F1 --cache cache/ph2_224_unet_sog --split all --out-dir $(STUDY2_F)/F1/ph2 \
		$(STUDY2_TTA)
	$(PYTHON) evaluate.py --run $(STUDY2_F)/F2 --source isic2017 --out-dir $(STUDY2_F)/F2/source_isic2017 $(STUDY2_TTA)
	$(PYTHON) evaluate.py --run $(STUDY2_F)/F3_7class $(STUDY2_TTA)
	$(PYTHON) bench/study2.py --read "$(STUDY2_F)/F1:HAM10000 test" "$(STUDY2_F)/F1/isic2017_test:ISIC 2017 test" \
		"$(STUDY2_F)/F1/ph2:PH2" "$(STUDY2_F)/F2/source_isic2017:ISIC 2017 test, second source" \
		"$(STUDY2_F)/F3_7class:HAM10000 test, 7 classes" --out bench/results/study2_final --plots docs/results/study2

# Hair removal judged by what it does to the diagnosis: stage 3's recipe (the study's best single
# recipe at 160 px) trained on caches with each hair removal, same data and seed, compared on
# validation, on ISIC 2017 train+val (external validation) and on PH2.
HAIR_STUDY_MODES = legacy on off
hair-study: | $(PY_DEPS)  ## stage 3's recipe with each hair removal: validation, ISIC 2017 train+val, PH2 (1-2 h)
	$(foreach mode,$(HAIR_STUDY_MODES),$(call recipe_run,hair/$(mode),efficientnet_lite0,wbce,full,full,$(STUDY_TRAIN_SIZE),,HAIR=$(mode) external-val) &&) true
	$(PYTHON) bench/hair_study.py --runs $(addprefix runs/hair/,$(HAIR_STUDY_MODES)) --out bench/results/hair_study

# fp32: at 64 px bf16 autocast trains slower on a CPU than fp32 (17 s an epoch against 10 here)
demo:  ## the whole pipeline on synthetic images, under 2 minutes on 2 CPU cores
	$(MAKE) all DATA=synthetic SYNTHETIC_N=1000 RUN=demo IMG_SIZE=64 TRAIN_SIZE=64 EPOCHS=6 ARCH=efficientnet_lite0 \
		BATCH_SIZE=32 LR=2e-3 TRAIN_FLAGS="--precision fp32"

test: | $(PY_DEPS)  ## run the test suite
	$(PYTHON) -m pytest -q tests

bench: | $(PY_DEPS)  ## benchmarks on the real images in SHARED (about an hour with the segmenter's training; results under cache/ and bench/results/)
	$(PYTHON) fetch_data.py --from-dir $(SHARED)/ham10000_full --out data/hamfull
	$(PYTHON) preprocess.py --data data/hamfull --img-size 224
	$(PYTHON) fetch_data.py --from-dir $(SHARED)/ph2 --out data/ph2 --assign-split test
	$(PYTHON) preprocess.py --data data/ph2 --score-masks $(SHARED)/ph2/masks
	$(PYTHON) fetch_data.py --from-dir $(SHARED)/ham10000_224 --out data/ham224
	$(PYTHON) preprocess.py --data data/ham224 --overlay-sheet 50
	$(PYTHON) bench/hair_removal.py --shared $(SHARED) --out bench/results/hair_removal
	$(PYTHON) bench/preprocess_speed.py --n 500 --workers 2 --out bench/results/preprocess_speed.json
	$(PYTHON) bench/train_speed.py --cache cache/ham224_224 --img-size 224 --out bench/results/train_speed.json
	$(MAKE) segmenter
	$(PYTHON) preprocess.py --data data/hamfull --img-size 224 --segmenter unet --segmenter-model $(SEG_RUN)/model.pt
	$(PYTHON) preprocess.py --data data/ph2 --img-size 224 --segmenter unet --segmenter-model $(SEG_RUN)/model.pt
	$(PYTHON) bench/segmenter.py --data data/hamfull --split test --classical cache/hamfull_224 \
		--unet cache/hamfull_224_unet --name hamfull_test --model $(SEG_RUN)/model.pt
	$(PYTHON) bench/segmenter.py --data data/ph2 --classical cache/ph2_224 --unet cache/ph2_224_unet --name ph2

clean:  ## remove caches, runs and synthetic data (keeps downloaded data and the venv)
	rm -rf cache runs data/synthetic

distclean: clean  ## also remove all data and the virtual environment
	rm -rf data $(VENV)

help:  ## list targets and variables
	@echo "targets:"
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z0-9-]+):.*## (.*)/  \1\t\2/' | expand -t 16
	@echo "variables (current value):"
	@$(foreach v,DATA SOURCE FROM_DIR SYNTHETIC_N ARCH EPOCHS IMG_SIZE TRAIN_SIZE BATCH_SIZE LR LOSS AUG INPUT \
		HAIR SEGMENTER SEG_RUN SEG_MODEL COLOUR METADATA TTA TARGET_RECALL FETCH_FLAGS TRAIN_FLAGS TEST_SOURCE MEMBERS \
		SHARED RUN EXPORT_DIR IMAGES MODEL PREDICT_OUT PYTHON,printf '  %-14s %s\n' '$(v)' '$($(v))';)
