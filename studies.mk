# The studies' targets (docs/first_edition.md, second_edition.md, hair_removal.md, third_edition.md,
# seven_classes.md):
# included by the Makefile, whose variables, macros and pipeline targets they run.
.PHONY: study study2-screen study2-levers study2-final study2-tta study2-test hair-study seven-screen seven-full seven-export \
	four-data four-screen four-full four-full-read crop-fit-study segmenter-screen third-data third-screen third-full third-ensemble

# The first edition (docs/first_edition.md): the reference study's stages, each a run of its own on the same
# lesion-level split and seed, evaluated on the internal test split and on PH2. Finished stages
# are not run again; an interrupted one resumes.
STUDY_DATA   ?= ham224
STUDY_FROM   ?= $(SHARED)/ham10000_224
STUDY_EPOCHS ?= 10
STUDY_TRAIN_SIZE ?= 160
STUDY_IMG_SIZE ?= 224
# The first study's caches were built with the legacy hair removal; its stages keep it, so that
# `make study` reproduces what docs/first_edition.md reports.
STUDY_HAIR   ?= legacy
# The first study's recipe where a stage does not set it: before the reference recipe's defaults
STUDY1_PINS := SEGMENTER=classical COLOUR=none CROP_FIT=inside METADATA=off TTA=off
# $(1) run folder under runs/, $(2) arch, $(3) loss, $(4) augmentation, $(5) input, $(6) training
# size, $(7) more train flags, $(8) more make variables and goals
recipe_run = $(MAKE) all external DATA=$(STUDY_DATA) FROM_DIR=$(STUDY_FROM) CACHE_SIZE=$(STUDY_IMG_SIZE) EPOCHS=$(STUDY_EPOCHS) \
	RUN=$(1) ARCH=$(2) LOSS=$(3) AUG=$(4) INPUT=$(5) TRAIN_FLAGS="--input-size $(6) $(7)" $(STUDY1_PINS) $(8)
# $(1) run name, $(2) arch, $(3) loss, $(4) augmentation, $(5) input, $(6) training size, $(7) more flags
study_stage = $(call recipe_run,study/$(1),$(2),$(3),$(4),$(5),$(6),$(7),HAIR=$(STUDY_HAIR))
# $(1) run name, $(2) the member stages, whose mean probability it is
study_ensemble = $(MAKE) all external DATA=$(STUDY_DATA) FROM_DIR=$(STUDY_FROM) CACHE_SIZE=$(STUDY_IMG_SIZE) \
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

# Study, second edition (docs/second_edition.md, its protocol). Stage S screens levers cheaply
# on validation only: ham10000_full's val split and ISIC 2017 train+val (external validation); no
# test split and no PH2 image is read. $(1) arm name, $(2) input, $(3) segmenter, $(4) colour constancy
STUDY2_FROM ?= $(SHARED)/ham10000_full
# the segmenter the study trained (HAM10000's masks alone), and each stage's own flags for the rest
STUDY2_PINS := $(HAM_SEGMENTER) SEG_MODEL=runs/segmenter_ham10000/model.pt CROP_FIT=inside METADATA=off TTA=off
screen_run = $(MAKE) validate external-val DATA=hamfull FROM_DIR=$(STUDY2_FROM) CACHE_SIZE=224 EPOCHS=3 \
	RUN=study2/screen/$(1) ARCH=efficientnet_lite0 LOSS=wbce AUG=full INPUT=$(2) SEGMENTER=$(3) COLOUR=$(4) \
	TRAIN_FLAGS="--input-size 128 --seed 0" $(STUDY2_PINS)
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
	FROM_DIR="$(STUDY2_FROM) $(5)" CACHE_SIZE=224 EPOCHS=3 RUN=study2/levers/$(1) ARCH=$(2) LOSS=$(3) AUG=full \
	INPUT=crop SEGMENTER=unet COLOUR=shades_of_gray TRAIN_FLAGS="--input-size 128 --seed 0 $(4)" $(STUDY2_PINS)
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

# Stage F: full length, S4's recipe with the levers stage T kept (docs/second_edition.md), 10 epochs at 160 px.
# F1 is the final system; F2 the same recipe with ISIC 2017 train as a second source; F3 the
# 7-class model. $(1) run, $(2) data, $(3) its folders, $(4) loss, $(5) more train.py flags
STUDY2_F       := runs/study2/final
STUDY2_F_ARCH  ?= efficientnet_lite0
STUDY2_F_FLAGS ?= --metadata
final_run = $(MAKE) validate $(if $(filter hamfull,$(2)),external-val) DATA=$(2) FROM_DIR="$(3)" CACHE_SIZE=224 \
	EPOCHS=10 RUN=study2/final/$(1) ARCH=$(STUDY2_F_ARCH) LOSS=$(4) AUG=full INPUT=crop SEGMENTER=unet \
	COLOUR=shades_of_gray TRAIN_FLAGS="--input-size 160 --seed 0 $(STUDY2_F_FLAGS) $(5)" $(STUDY2_PINS)
study2-final: | $(PY_DEPS)  ## study, 2nd edition, stage F: the full-length runs (validation only; about 95 min on 2 cores)
	$(call final_run,F1,hamfull,$(STUDY2_FROM),wbce)
	$(call final_run,F2,ham+isic2017,$(STUDY2_FROM) $(SHARED)/isic2017,wbce)
	$(call final_run,F3_7class,hamfull,$(STUDY2_FROM),ce,--task multiclass --class-weights balanced)
	$(if $(STUDY2_TTA),$(MAKE) study2-tta)

# Test-time augmentation, used because it raised F1's validation ROC-AUC (docs/second_edition.md): each run's
# thresholds are then chosen on its own augmented validation probabilities
STUDY2_TTA ?= --tta
study2-tta: | $(PY_DEPS)  ## study, 2nd edition: augmented validation probabilities and thresholds of the F runs
	for run in F1 F2 F3_7class; do \
		$(PYTHON) evaluate.py --run $(STUDY2_F)/$$run --split val --tta --out-dir $(STUDY2_F)/$$run/val_tta && \
		$(PYTHON) threshold.py --run $(STUDY2_F)/$$run --probs $(STUDY2_F)/$$run/val_tta/test_probs.csv || exit 1; \
	done

# The single reading of the three test sets, by the final system committed in docs/second_edition.md beforehand
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

# Issue 25's classifier screen (docs/segmenter.md): the reference recipe for 3 epochs at 128 px on
# crops cut by the first U-Net and by make segmenter's two-source one, scored on validation only:
# HAM10000 val, ISIC 2017 train+val with its age and sex and with them hidden
SCREEN_RUN ?= runs/screen25
SCREEN_FIRST_SEG ?= runs/segmenter_ham10000/model.pt
screen_cache = $(PYTHON) preprocess.py --data data/$(1) --cache-size 224 --colour-constancy shades_of_gray --segmenter unet \
	--segmenter-model $(3) $(4) --out cache/$(1)_224_screen_$(2)
screen_arm = $(call screen_cache,hamfull,$(1),$(2),$(3)) && $(call screen_cache,isic2017_trainval,$(1),$(2),$(3)) && \
	$(PYTHON) train.py --cache cache/hamfull_224_screen_$(1) --run-dir $(SCREEN_RUN)/$(1) --arch efficientnet_lite0 \
		--input crop --metadata --loss wbce --aug full --input-size 128 --epochs 3 --seed 0 && \
	$(PYTHON) threshold.py --run $(SCREEN_RUN)/$(1) && \
	$(PYTHON) evaluate.py --run $(SCREEN_RUN)/$(1) --cache cache/isic2017_trainval_224_screen_$(1) --split all --no-tta \
		--bootstrap 0 --out-dir $(SCREEN_RUN)/$(1)/isic2017_trainval && \
	$(PYTHON) evaluate.py --run $(SCREEN_RUN)/$(1) --cache cache/isic2017_trainval_224_screen_$(1) --split all --no-tta \
		--bootstrap 0 --hide-metadata --out-dir $(SCREEN_RUN)/$(1)/isic2017_trainval_hidden
segmenter-screen: $(SEG_RUN)/config.json | $(PY_DEPS)  ## the classifier on the first and the two-source segmenter's crops, 3 epochs each, validation only (40 min)
	$(MAKE) data/isic2017_trainval/metadata.csv
	test -f data/hamfull/metadata.csv || $(PYTHON) fetch_data.py --from-dir $(SHARED)/ham10000_full --out data/hamfull
	$(call screen_arm,first,$(SCREEN_FIRST_SEG))
	$(call screen_arm,two,$(SEG_RUN)/model.pt)
	$(PYTHON) bench/hair_study.py --runs $(SCREEN_RUN)/first $(SCREEN_RUN)/two --out bench/results/segmenter/classifier_screen

# Issue 25's crop coverage: the square crop centred on the lesion and padded beyond the image
# (preprocess.py --crop-fit pad) beside the crop kept inside it, both U-Nets' masks scored against
# the experts' (after make segmenter-bench, whose caches are the inside ones); then the screen's
# third arm, the first U-Net's padded crops (against make segmenter-screen's arm first)
crop_fit_bench = $(PYTHON) bench/segmenter.py --data data/$(1) --cache unet_ham10000=cache/$(1)_224_unet_reference \
	--cache unet_ham10000_pad=cache/$(1)_224_unet_reference_pad --cache unet_two_sources=cache/$(1)_224_unet \
	--cache unet_two_sources_pad=cache/$(1)_224_unet_pad --crops 8 --out bench/results/crop_fit
crop-fit-study: $(SEG_RUN)/config.json | $(PY_DEPS)  ## the padded crop's lesion coverage, then its classifier screen arm (30 min)
	$(call unet_caches,$(SEG_DATA),--crop-fit pad,_pad)
	$(call unet_caches,ph2,--crop-fit pad,_pad)
	$(call crop_fit_bench,$(SEG_DATA)) --split val --name val
	$(call crop_fit_bench,$(SEG_DATA)) --split test --name hamfull_test
	$(call crop_fit_bench,ph2) --name ph2
	$(call screen_arm,first_pad,$(SCREEN_FIRST_SEG),--crop-fit pad)
	$(PYTHON) bench/hair_study.py --runs $(SCREEN_RUN)/first $(SCREEN_RUN)/two $(SCREEN_RUN)/first_pad \
		--out bench/results/crop_fit/classifier_screen

# The reference model of the third edition and the seven-class study (C_s1, with its 7-class network
# as classes.pt), shipped until the fourth edition's JLP3 replaced it: that edition's arms started
# from it and were read against it, and the seven-class study's K4 learned on it. Its files from git.
PREVIOUS_REFERENCE := cache/reference_third
PREVIOUS_REFERENCE_COMMIT := a644f92
$(PREVIOUS_REFERENCE)/model.pt:
	mkdir -p $(@D)
	$(foreach f,classes.pt segmenter.pt thresholds.json export.json model.pt,git show \
		$(PREVIOUS_REFERENCE_COMMIT):models/reference/$(f) > $(@D)/$(f).part && mv $(@D)/$(f).part $(@D)/$(f) &&) true

# Study, third edition (docs/third_edition.md, its protocol): ranking at clinics the model never
# saw, every choice read on an outside panel (ISIC 2017, PH2, isic2020_dev) at two seeds. Data:
# ham10000_full's train and val rows only (its test split is never imported here), and the panel's
# sites; every cache is cut by the shipped model's U-Net. $(1) dataset, $(2) crop fit
THIRD_SEG ?= $(REFERENCE)/segmenter.pt
THIRD_SITES := isic2017_trainval ph2 isic2020_dev
third_cache = test -f cache/$(1)_224_third_$(2)/index.csv || $(PYTHON) preprocess.py --data data/$(1) --cache-size 224 \
	--colour-constancy shades_of_gray --segmenter unet --segmenter-model $(THIRD_SEG) --crop-fit $(2) \
	--out cache/$(1)_224_third_$(2)
third-data: data/isic2017_trainval/metadata.csv data/ph2/metadata.csv | $(PY_DEPS)  ## study, 3rd edition: its datasets and padded-crop caches
	test -f data/hamfull_trainval/metadata.csv || $(PYTHON) fetch_data.py --from-dir $(SHARED)/ham10000_full \
		--only-split train val --out data/hamfull_trainval
	test -f data/isic2020_dev/metadata.csv || $(PYTHON) fetch_data.py --from-dir $(SHARED)/isic2020_dev --out data/isic2020_dev
	test -f data/ham+isic2017_trainval/metadata.csv || $(PYTHON) fetch_data.py --from-dir $(SHARED)/ham10000_full \
		$(SHARED)/isic2017 --only-split train val --out data/ham+isic2017_trainval
	$(foreach data,hamfull_trainval ham+isic2017_trainval $(THIRD_SITES),$(call third_cache,$(data),pad) &&) true
	$(foreach data,hamfull_trainval $(THIRD_SITES),$(call third_cache,$(data),inside) &&) true

# The screen: 3 epochs at 128 px, seeds 0 and 1, each arm one change to the baseline B (the shipped
# recipe); a finished run is not trained again, an interrupted one resumes. $(1) arm, $(2) dataset,
# $(3) crop fit, $(4) train.py flags that change B's
THIRD_RUNS  ?= runs/third
THIRD_SEEDS ?= 0 1
THIRD_BUDGET ?= --input-size 128 --epochs 3
# seeded_runs: $(1) run folder without the seed, $(2) cache, $(3) train.py flags, $(4) the seeds (default
# THIRD_SEEDS); seeded_dirs: the runs' folders, comma-separated (bench/panel.py's and bench/seven_classes.py's --arm)
seeded_runs = $(foreach seed,$(or $(4),$(THIRD_SEEDS)),(run=$(1)_s$(seed); test -f $$run/config.json || \
	$(PYTHON) train.py --cache $(2) --run-dir $$run --arch efficientnet_lite0 --input crop --metadata $(3) \
		--seed $(seed) $$(test -f $$run/last.pt && echo --resume)) &&) true
seeded_dirs = $(subst $(eval) ,$(comma),$(foreach seed,$(THIRD_SEEDS),$(1)_s$(seed)))
comma := ,
third_arm = $(call seeded_runs,$(THIRD_RUNS)/$(1),cache/$(2)_224_third_$(3),--loss wbce --aug full $(THIRD_BUDGET) $(4))
third_runs = $(call seeded_dirs,$(THIRD_RUNS)/$(1))
# L1 trains on ISIC 2017 train, so it is set beside B on ISIC 2017 val alone, in a table of its own
THIRD_ARMS ?= L3a L1 L2 L4 L3b L5a L5b L3d
THIRD_ARM_L1  := ham+isic2017_trainval,pad,--val-source ham10000_full
THIRD_ARM_L2  := hamfull_trainval,pad,--aug shift
THIRD_ARM_L3a := hamfull_trainval,pad,--input full
THIRD_ARM_L3b := hamfull_trainval,inside,
THIRD_ARM_L4  := hamfull_trainval,pad,--task multiclass --loss ce --class-weights balanced
THIRD_ARM_L5a := hamfull_trainval,pad,--arch efficientnet_lite1
THIRD_ARM_L5b := hamfull_trainval,pad,--input-size 192
THIRD_ARM_L3d := hamfull_trainval,pad,--input both
arm_field = $(word $(2),$(subst $(comma), ,$(subst $(eval) ,^,$(THIRD_ARM_$(1)))))
third-screen: | $(PY_DEPS)  ## study, 3rd edition: the baseline and each arm for 3 epochs at 128 px, seeds 0 and 1, on the outside panel
	$(call third_arm,B,hamfull_trainval,pad,)
	$(PYTHON) bench/panel.py --arm B=$(call third_runs,B) --arm L6=$(call third_runs,B) --general-sites L6 \
		--out bench/results/third/L6_sites
	$(foreach arm,$(THIRD_ARMS),$(call third_arm,$(arm),$(call arm_field,$(arm),1),$(call arm_field,$(arm),2),$(subst ^, ,$(call arm_field,$(arm),3))) &&) true
	$(PYTHON) bench/panel.py --arm B=$(call third_runs,B) $(foreach arm,$(filter-out L1,$(THIRD_ARMS)),--arm \
		$(arm)=$(call third_runs,$(arm))) --out bench/results/third/screen
	$(if $(filter L1,$(THIRD_ARMS)),$(PYTHON) bench/panel.py --arm B=$(call third_runs,B) --arm L1=$(call third_runs,L1) \
		--out bench/results/third/screen_L1)

# The full-length stage (docs/third_edition.md): B and C, the screen's passing levers together, at
# the shipped budget (10 epochs at 160 px), seeds 0 and 1, held to the keep rule. THIRD_FULL_FLAGS
# and THIRD_FULL_DATA are C's train.py flags and dataset: the two arms of the whole screen (all
# eight levers) that passed, L1 and L3a, fixed before the runs (docs/third_edition.md).
THIRD_FULL_DATA  ?= ham+isic2017_trainval
THIRD_FULL_FLAGS ?= --input full --val-source ham10000_full
third-full: THIRD_RUNS = runs/third_full
third-full: THIRD_BUDGET = --input-size 160 --epochs 10
third-full: | $(PY_DEPS)  ## study, 3rd edition: B and the combined levers at full length, seeds 0 and 1, held to the keep rule
	$(call third_arm,B,hamfull_trainval,pad,)
	$(call third_arm,C,$(THIRD_FULL_DATA),pad,$(THIRD_FULL_FLAGS))
	$(PYTHON) bench/panel.py --arm B=$(call third_runs,B) --arm C=$(call third_runs,C) --rule keep \
		--out bench/results/third/full

# The ensemble arm (docs/third_edition.md, committed before it is read): the full-length arm's two
# seeds as one ensemble (the mean probability) in each seed's place, beside each seed alone. It has
# one instance, not two seeds: reported, not kept by the rule. No training: the runs' kept readings.
THIRD_ENSEMBLE_ARM ?= C
# the seeds' runs joined by + (one ensemble), once for each seed's place
third_ensemble = $(subst $(comma),+,$(call third_runs,$(THIRD_ENSEMBLE_ARM)))
third-ensemble: THIRD_RUNS = runs/third_full
third-ensemble: | $(PY_DEPS)  ## study, 3rd edition: the full-length arm's two seeds as one ensemble, beside each alone
	$(PYTHON) bench/panel.py --arm $(THIRD_ENSEMBLE_ARM)=$(call third_runs,$(THIRD_ENSEMBLE_ARM)) \
		--arm ensemble=$(third_ensemble)$(comma)$(third_ensemble) --rule keep --out bench/results/third/ensemble

# Seven classes (docs/seven_classes.md, its protocol): a 7-class model beside the binary one, its
# recipe chosen on HAM10000 val balanced accuracy at seeds 0 and 1. $(1) run folder without the
# seed, $(2) budget, $(3) train.py flags beyond the 7-class task
seven_arm = $(call seeded_runs,$(1),cache/hamfull_trainval_224_third_pad,--task multiclass --loss ce --aug full $(2) $(3))
seven_runs = $(call seeded_dirs,$(1))
SEVEN_SCREEN := --input-size 128 --epochs 3
# K0's screen runs are the third edition's L4 runs: the same command
seven-screen: | $(PY_DEPS)  ## 7 classes: the recipe's arms for 3 epochs at 128 px, seeds 0 and 1, on HAM10000 val
	$(call seven_arm,runs/third/L4,$(SEVEN_SCREEN),--class-weights balanced)
	$(call seven_arm,runs/seven/K1,$(SEVEN_SCREEN),--sampler balanced)
	$(call seven_arm,runs/seven/K2,$(SEVEN_SCREEN),--class-weights balanced --label-smoothing 0.1)
	$(call seven_arm,runs/seven/K3,--input-size 128 --epochs 6,--class-weights balanced)
	$(PYTHON) bench/seven_classes.py --arm K0=$(call seven_runs,runs/third/L4) --arm K1=$(call seven_runs,runs/seven/K1) \
		--arm K2=$(call seven_runs,runs/seven/K2) --arm K3=$(call seven_runs,runs/seven/K3) --rule screen \
		--out bench/results/seven/screen

# The full length: K0 and S (K0 with the screen's passing changes: SEVEN_FULL_FLAGS and
# SEVEN_FULL_EPOCHS, set from the screen and committed before the runs), then each run's val read
# with test-time augmentation, against without; K4 against each (the protocol reads the one against
# the recipe the keep rule chose: full_K4_vs_<arm>.md)
SEVEN_FULL_FLAGS  ?= --sampler balanced
SEVEN_FULL_EPOCHS ?= 20
# K4: a head on the shipped binary model's frozen network, read as that model reads its images
# (SEVEN_K4_FLAGS: its input form and size, the reference model's since issue 33: the whole image
# at 160 px; a test holds them to model.pt's)
SEVEN_K4_FROM  ?= $(PREVIOUS_REFERENCE)/model.pt
SEVEN_K4_FLAGS ?= --input full --input-size 160
seven_tta = $(foreach seed,$(THIRD_SEEDS),(test -f $(1)_s$(seed)/val_tta/test_probs.csv || \
	($(PYTHON) threshold.py --run $(1)_s$(seed) && $(PYTHON) evaluate.py --run $(1)_s$(seed) --split val --tta \
		--bootstrap 0 --out-dir $(1)_s$(seed)/val_tta)) &&) true
seven_tta_files = $(subst $(eval) ,$(comma),$(foreach seed,$(THIRD_SEEDS),$(1)_s$(seed)/val_tta/test_probs.csv))
seven-full: | $(PY_DEPS) $(PREVIOUS_REFERENCE)/model.pt  ## 7 classes: K0, the screen's combined recipe and K4 (a head on the shipped network) at full length, seeds 0 and 1
	$(call seven_arm,runs/seven_full/K0,--input-size 160 --epochs 10,--class-weights balanced)
	$(call seven_arm,runs/seven_full/S,--input-size 160 --epochs $(SEVEN_FULL_EPOCHS),$(SEVEN_FULL_FLAGS))
	$(call seven_arm,runs/seven_full/K4,--epochs 10,--class-weights balanced $(SEVEN_K4_FLAGS) \
		--frozen-from $(SEVEN_K4_FROM))
	$(call seven_tta,runs/seven_full/K0)
	$(call seven_tta,runs/seven_full/S)
	$(call seven_tta,runs/seven_full/K4)
	$(PYTHON) bench/seven_classes.py --arm K0=$(call seven_runs,runs/seven_full/K0) \
		--arm S=$(call seven_runs,runs/seven_full/S) --arm K4=$(call seven_runs,runs/seven_full/K4) \
		--rule keep --out bench/results/seven/full
	$(foreach arm,K0 S K4,$(PYTHON) bench/seven_classes.py --arm $(arm)=$(call seven_runs,runs/seven_full/$(arm)) \
		--arm $(arm)_tta=$(call seven_tta_files,runs/seven_full/$(arm)) --rule keep \
		--out bench/results/seven/full_tta_$(arm) &&) true
	$(foreach arm,K0 S,$(PYTHON) bench/seven_classes.py --arm $(arm)=$(call seven_runs,runs/seven_full/$(arm)) \
		--arm K4=$(call seven_runs,runs/seven_full/K4) --rule ship --out bench/results/seven/full_K4_vs_$(arm) &&) true

# The protocol applied to seven-full's tables (bench/seven_classes.py --decide), and the run it names
# exported as classes.pt beside the reference model (malignancy's files unchanged)
seven-export: | $(PY_DEPS)  ## 7 classes: the run the protocol chose, exported beside the reference model
	$(PYTHON) bench/seven_classes.py --decide bench/results/seven --runs runs/seven_full > bench/results/seven/decision.txt
	cat bench/results/seven/decision.txt
	$(PYTHON) export_model.py --run runs/third_full/C_s1 --classes $$(tail -1 bench/results/seven/decision.txt) \
		--out $(PREVIOUS_REFERENCE)

# Study, fourth edition (docs/fourth_edition.md, its protocol): one network for both answers, trained
# on three clinics (BCN20000 joins), both answers read at every site of the panel, at two seeds.
# Data: the train and val rows of ham10000_full, ISIC 2017 and bcn20000_84 (no test image of any),
# cut by the shipped model's U-Net as the third edition's caches; the panel's sites are third-data's.
FOUR_RUNS   ?= runs/four
FOUR_BUDGET ?= --input-size 128 --epochs 3 --epoch-size 8818
four-data: data/isic2017_trainval/metadata.csv data/ph2/metadata.csv | $(PY_DEPS)  ## study, 4th edition: HAM10000, ISIC 2017 and BCN20000 train+val, and the panel's caches
	test -f data/hamfull_trainval/metadata.csv || $(PYTHON) fetch_data.py --from-dir $(SHARED)/ham10000_full \
		--only-split train val --out data/hamfull_trainval
	test -f data/isic2020_dev/metadata.csv || $(PYTHON) fetch_data.py --from-dir $(SHARED)/isic2020_dev --out data/isic2020_dev
	test -f data/ham+isic2017_trainval/metadata.csv || $(PYTHON) fetch_data.py --from-dir $(SHARED)/ham10000_full \
		$(SHARED)/isic2017 --only-split train val --out data/ham+isic2017_trainval
	test -f data/three_trainval/metadata.csv || $(PYTHON) fetch_data.py --from-dir $(SHARED)/ham10000_full \
		$(SHARED)/isic2017 $(SHARED)/bcn20000_84 --only-split train val --out data/three_trainval
	$(foreach data,three_trainval ham+isic2017_trainval hamfull_trainval $(THIRD_SITES),$(call third_cache,$(data),pad) &&) true
# $(1) arm, $(2) dataset, $(3) train.py flags that change the baseline J's, $(4) the seeds (default all)
four_arm = $(call seeded_runs,$(FOUR_RUNS)/$(1),cache/$(2)_224_third_pad,--input full --val-source ham10000_full \
	--aug full $(FOUR_BUDGET) $(3),$(4))
FOUR_J := --task joint --loss wbce --class-weights balanced
FOUR_ARMS ?= J M U D DR DF DS DV
FOUR_ARM_J  := ham+isic2017_trainval,$(FOUR_J)
FOUR_ARM_M  := ham+isic2017_trainval,--task multiclass --loss ce --class-weights balanced
FOUR_ARM_U  := ham+isic2017_trainval,--task joint --loss wbce
FOUR_ARM_D  := three_trainval,$(FOUR_J)
FOUR_ARM_DR := three_trainval,$(FOUR_J) --resolution-aug 84
FOUR_ARM_DF := three_trainval,$(FOUR_J) --frame-aug 0.3
FOUR_ARM_DS := three_trainval,$(FOUR_J) --sampler source
FOUR_ARM_DV := three_trainval,$(FOUR_J) --general-sites
four_field = $(word $(2),$(subst $(comma), ,$(subst $(eval) ,^,$(FOUR_ARM_$(1)))))
four-screen: | $(PY_DEPS)  ## study, 4th edition: the baseline J and each arm for 3 epochs at 128 px (8,818 draws an epoch), seeds 0 and 1
	$(foreach arm,$(FOUR_ARMS),$(call four_arm,$(arm),$(call four_field,$(arm),1),$(subst ^, ,$(call four_field,$(arm),2))) &&) true
	$(PYTHON) bench/panel.py --four --arm J=$(call seeded_dirs,$(FOUR_RUNS)/J) $(foreach arm,$(filter-out J D,$(FOUR_ARMS)),\
		$(if $(filter D%,$(arm)),,--arm $(arm)=$(call seeded_dirs,$(FOUR_RUNS)/$(arm)))) \
		--arm ULA=$(call seeded_dirs,$(FOUR_RUNS)/U) --adjust ULA=la --arm JPB=$(call seeded_dirs,$(FOUR_RUNS)/J) \
		--adjust JPB=pb --out bench/results/four/screen
	$(PYTHON) bench/panel.py --four --arm J=$(call seeded_dirs,$(FOUR_RUNS)/J) --arm D=$(call seeded_dirs,$(FOUR_RUNS)/D) \
		--out bench/results/four/screen_D
	$(PYTHON) bench/panel.py --four --arm D=$(call seeded_dirs,$(FOUR_RUNS)/D) $(foreach arm,$(filter D%,$(filter-out D,\
		$(FOUR_ARMS))),--arm $(arm)=$(call seeded_dirs,$(FOUR_RUNS)/$(arm))) --out bench/results/four/screen_guards

# The full length (docs/fourth_edition.md, "Full length: the plan", committed before its runs): J at
# 10 epochs at 160 px over every training image (J10, the baseline) and at 20 (J20, the longer
# schedule), seeds 0 and 1; JPB and TTA are read on them without training. FOUR_FULL_ARMS picks the
# arms to train (a session may train some, a later one the rest: training is deterministic here).
FOUR_FULL_RUNS ?= runs/four_full
FOUR_FULL_ARMS ?= J10 J20
FOUR_FULL_J10 := --input-size 160 --epochs 10
FOUR_FULL_J20 := --input-size 160 --epochs 20
# JC: J continued from the then shipped malignancy network C_s1 (PREVIOUS_REFERENCE), the classes
# learned on it ("Full length, second part")
FOUR_JC_FROM ?= $(PREVIOUS_REFERENCE)/model.pt
FOUR_FULL_JC := --input-size 160 --epochs 5 --lr 1e-4 --init-from $(FOUR_JC_FROM)
# JLP: linear probing, then fine-tuning ("Full length, third part"): for each seed a 7-class head on
# FOUR_JC_FROM's network frozen (the probe: K4's recipe, 10 epochs), then JC started from it, 4 epochs
FOUR_JLP_PROBE := --task multiclass --loss ce --class-weights balanced --frozen-from $(FOUR_JC_FROM) --input-size 160 \
	--epochs 10
FOUR_JLP_TUNE := $(FOUR_J) --init-from $(FOUR_JC_FROM) --input-size 160 --epochs 4 --lr 1e-4
# JLP3: JLP's fine-tuning at a peak of 3e-5 from the same probes ("Full length, fifth part"); JLW, only
# if JLP3 fails: JLP's with the classes' loss weighted 0.5 beside the malignancy's
FOUR_JLP3_TUNE := $(FOUR_J) --init-from $(FOUR_JC_FROM) --input-size 160 --epochs 4 --lr 3e-5
FOUR_JLW_TUNE := $(FOUR_JLP_TUNE) --class-loss-weight 0.5
# four_jlp: arm $(1) (JLP, JLP3, JLW), each seed's probe (trained once, shared) then its fine-tuning
four_jlp = $(foreach s,$(THIRD_SEEDS),$(call four_arm,JLP_probe,ham+isic2017_trainval,$(FOUR_JLP_PROBE),$(s)) && \
	$(call four_arm,$(1),ham+isic2017_trainval,$(FOUR_$(1)_TUNE) --init-head $(FOUR_FULL_RUNS)/JLP_probe_s$(s)/model.pt,$(s)) &&) true
four-full: FOUR_BUDGET = $(FOUR_FULL_$(arm))
four-full: FOUR_RUNS = $(FOUR_FULL_RUNS)
four-full: | $(PY_DEPS) $(PREVIOUS_REFERENCE)/model.pt  ## study, 4th edition: J10, J20 (J at 10 and 20 epochs at 160 px), JC, JLP, JLP3, JLW (FOUR_FULL_ARMS="JLP3"), seeds 0 and 1
	$(foreach arm,$(FOUR_FULL_ARMS),$(if $(filter JLP JLP3 JLW,$(arm)),$(call four_jlp,$(arm)),$(call four_arm,$(arm),ham+isic2017_trainval,\
		$(FOUR_J))) &&) true

# The full length's tables (keep rule): JPB (J10's class biases chosen on HAM10000 val) and TTA (J10 read
# with the 8 flips and rotations) beside J10; J20 beside J10 where its runs or records exist. Each run
# trained here is recorded in FOUR_RECORDS (committed: config and probabilities, no weights); a run
# whose weights are not here is read from its record, so runs of different machines pair.
FOUR_RECORDS ?= docs/results/four_full
four_full_runs = $(call seeded_dirs,$(FOUR_FULL_RUNS)/$(1))
four_full_here = $(wildcard $(FOUR_FULL_RUNS)/$(1)_s1/config.json $(FOUR_RECORDS)/$(1)_s1/config.json)
# four_tta_read: arm $(1) (once its runs or records exist) beside $(3) (its runs $(4)), both with TTA, by the
# rule $(2), into full_$(1)_vs_$(5)_tta
four_tta_read = $(if $(call four_full_here,$(1)),$(PYTHON) bench/panel.py --four --rule $(2) --record $(FOUR_RECORDS) \
	--arm $(3)TTA=$(4) --arm $(1)TTA=$(call four_full_runs,$(1)) --tta $(3)TTA $(1)TTA --out bench/results/four/full_$(1)_vs_$(5)_tta)
four-full-read: | $(PY_DEPS) $(PREVIOUS_REFERENCE)/model.pt  ## study, 4th edition: the full length's tables (JPB, TTA, J20 beside J10; JC, JLP beside the reference), from runs or records
	$(PYTHON) bench/panel.py --four --rule keep --record $(FOUR_RECORDS) --arm J10=$(call four_full_runs,J10) \
		--arm JPB=$(call four_full_runs,J10) --adjust JPB=pb --arm TTA=$(call four_full_runs,J10) --tta TTA \
		--out bench/results/four/full
	$(if $(call four_full_here,J20),$(PYTHON) bench/panel.py --four --rule keep --record $(FOUR_RECORDS) \
		--arm J10=$(call four_full_runs,J10) --arm J20=$(call four_full_runs,J20) --out bench/results/four/full_J20)
	$(call four_tta_read,JC,ship,REF,$(PREVIOUS_REFERENCE)$(comma)$(PREVIOUS_REFERENCE),reference)
	$(call four_tta_read,JC,keep,J10,$(call four_full_runs,J10),J10)
	$(call four_tta_read,JLP,ship,REF,$(PREVIOUS_REFERENCE)$(comma)$(PREVIOUS_REFERENCE),reference)
	$(call four_tta_read,JLP,keep,JC,$(call four_full_runs,JC),JC)
	$(call four_tta_read,JLP3,ship,REF,$(PREVIOUS_REFERENCE)$(comma)$(PREVIOUS_REFERENCE),reference)
	$(call four_tta_read,JLP3,keep,JLP,$(call four_full_runs,JLP),JLP)
	$(call four_tta_read,JLW,ship,REF,$(PREVIOUS_REFERENCE)$(comma)$(PREVIOUS_REFERENCE),reference)
	$(call four_tta_read,JLW,keep,JLP,$(call four_full_runs,JLP),JLP)
