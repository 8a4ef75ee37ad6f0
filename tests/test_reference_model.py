"""The reference model that ships in models/reference: compact and complete, used by predict.py
when no --run is given, faithful to evaluate.py on real HAM10000 images prepared the same way, and
a damaged copy ends with one line naming the file. Real images are read where they lie in
../shared/data (train/val images only: no test image of the study is read here)."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, SHARED_DATA

import common
import evaluate
import fetch_data
import predict
import preprocess

REFERENCE = ROOT / "models" / "reference"
HAM = SHARED_DATA / "ham10000_full"


def real_rows(n_malignant, n_benign):
    """Labelled HAM10000 rows outside the study's test split, with every metadata field known."""
    labels = pd.read_csv(HAM / "labels.csv", dtype={"image_id": str})
    known = labels[labels["split"].isna() & labels["age"].notna() & labels["sex"].isin(common.SEXES)
                   & labels["localization"].isin(common.SITES)]
    malignant = known["label"].isin(common.MALIGNANT_DX)
    return pd.concat([known[malignant].head(n_malignant), known[~malignant].head(n_benign)])


def test_the_reference_folder_is_compact_complete_and_the_recipe_it_claims():
    shipped = [p for p in REFERENCE.iterdir() if p.name != "clinics"]  # a user's site calibrations are theirs
    files = sorted(p.name for p in shipped)
    assert files == ["MODEL_CARD.md", "export.json", "model.pt", "segmenter.pt", "thresholds.json"]
    assert sum(p.stat().st_size for p in shipped) <= 25 * 2**20
    # one network for both answers (docs/fourth_edition.md): a malignancy logit beside the 7 classes',
    # fine-tuned from the third edition's malignancy network and a 7-class probe on it
    exported = json.loads((REFERENCE / "export.json").read_text())
    args = exported["run_config"]["args"]
    assert (args["task"], args["class_weights"], args["loss"]) == ("joint", "balanced", "wbce")
    assert args["init_from"] and args["init_head"] and "classes_run" not in exported
    assert all(exported["sha256"][name] == common.file_digest(REFERENCE / name) for name in exported["sha256"])
    checkpoint = torch.load(REFERENCE / "model.pt", weights_only=True)
    assert all(t.dtype == torch.float16 for t in checkpoint["model"].values() if t.is_floating_point())
    assert (checkpoint["arch"], checkpoint["task"], checkpoint["num_outputs"], checkpoint["input"], checkpoint["input_size"],
            checkpoint["metadata"], checkpoint["loss"]) == ("efficientnet_lite0", "joint", 8, "full", 160, True, "wbce")
    key = checkpoint["preprocess"]
    assert (key["segmenter"], key["segmenter_model"], key["colour_constancy"]) == ("unet", "segmenter.pt",
                                                                                   "shades_of_gray")
    assert common.preprocess_settings(key)["crop_fit"] == "pad"
    assert key["segmenter_sha256"] == common.file_digest(REFERENCE / "segmenter.pt")
    chosen = json.loads((REFERENCE / "thresholds.json").read_text())
    assert chosen["tta"] is True and "recall_bound" in chosen["thresholds"]
    assert chosen["thresholds"]["recall_bound"] <= chosen["thresholds"]["recall_target"]


def test_the_make_targets_that_read_the_reference_model_prepare_images_as_it_was_trained():
    """make reference-test and reference-bench build their caches with the model's own crop and
    colour constancy (evaluate.py would refuse a cache prepared otherwise, after the work)."""
    settings = common.preprocess_settings(torch.load(REFERENCE / "model.pt", weights_only=True)["preprocess"])
    for target in ("reference-test", "reference-bench"):
        out = subprocess.run(["make", "-n", target, "PYTHON=python3"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
        caches = [line for line in out.stdout.splitlines() if "preprocess.py" in line]
        assert caches, out.stdout + out.stderr
        for line in caches:
            assert f"--crop-fit {settings['crop_fit']}" in line
            assert f"--colour-constancy {settings['colour_constancy']}" in line


def test_the_make_defaults_are_the_reference_models_recipe():
    """A user's `make all` trains what the shipped model was validated as, not an older recipe."""
    checkpoint = torch.load(REFERENCE / "model.pt", weights_only=True)
    settings = common.preprocess_settings(checkpoint["preprocess"])
    out = subprocess.run(["make", "help", "PYTHON=python3"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    defaults = dict(line.split(None, 1) for line in out.stdout.splitlines() if line.startswith("  ") and
                    len(line.split()) == 2)
    assert (defaults["ARCH"], defaults["INPUT"], defaults["INPUT_SIZE"], defaults["LOSS"]) == (
        checkpoint["arch"], checkpoint["input"], str(checkpoint["input_size"]), checkpoint["loss"])
    assert defaults["METADATA"] == ("on" if checkpoint["metadata"] else "off")
    assert (defaults["SEGMENTER"], defaults["COLOUR"], defaults["CROP_FIT"], defaults["HAIR"]) == (
        checkpoint["preprocess"]["segmenter"], settings["colour_constancy"], settings["crop_fit"],
        settings["hair_removal"])
    assert defaults["TTA"] == ("on" if json.loads((REFERENCE / "thresholds.json").read_text())["tta"] else "off")
    # one network for both answers, fine-tuned as it was: its task, epochs and learning rate
    assert (defaults["TASK"], int(defaults["JOINT_EPOCHS"]), float(defaults["JOINT_LR"])) == (
        checkpoint["task"], checkpoint["args"]["epochs"], checkpoint["args"]["lr"])
    # its training images: HAM10000 with ISIC 2017's training images (the third edition's C), which
    # a default download takes from the Archive, choosing the epoch on HAM10000's val rows alone
    assert checkpoint["args"]["val_source"] == ["ham10000_full"] and "isic2017" in checkpoint["args"]["cache"]
    fetch = subprocess.run(["make", "-n", "data", "PYTHON=python3"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60).stdout
    assert '--collection HAM10000 --collection "Challenge 2017: Training"' in fetch
    # the 7-class head trained on its frozen network (make seven-full's K4) reads images as it does
    k4 = [line for line in subprocess.run(["make", "-n", "seven-full", "PYTHON=python3"], cwd=ROOT, capture_output=True,
                                          text=True, timeout=60).stdout.splitlines() if "--frozen-from" in line]
    assert k4 and all(line.split("--input ")[-1].split()[0] == checkpoint["input"] and
                      line.split("--input-size ")[-1].split()[0] == str(checkpoint["input_size"]) for line in k4)


def test_predict_with_no_run_uses_the_reference_model(tmp_path):
    rows = real_rows(1, 1)
    (tmp_path / "images").symlink_to(HAM / "images")
    files = list(rows["filename"])  # images/ISIC_....jpg, as a user in that folder types them
    out = subprocess.run([sys.executable, str(ROOT / "predict.py"), *files], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    pred = pd.read_csv(tmp_path / "predictions.csv")  # in the working folder, not inside models/
    assert len(pred) == 2 and (pred["operating_point"] == "recall_bound").all() and (pred["tta"] == 1).all()
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["file", "probability", "decision", "most", "likely", "class"]
    for row in pred.itertuples():  # malignancy, its decision, and the most likely of the seven classes
        assert any(line.split()[:5] == [row.file, f"{row.malignancy_prob:.3f}", row.decision, row.top_class,
                                        f"{row.top_class_prob:.2f}"] and
                   (line.split()[5:6] == ["<-"]) == (row.answers_agree == 0) for line in lines)
    assert str(REFERENCE) in out.stdout


def test_predict_gives_what_evaluate_gives_on_real_images(tmp_path):
    rows = real_rows(3, 3)
    source = tmp_path / "source"
    source.mkdir()
    (source / "images").symlink_to(HAM / "images")  # the images stay where they are
    rows.drop(columns=["mask", "split"]).to_csv(source / "labels.csv", index=False)
    fetch_data.main(fetch_data.parse_args(["--from-dir", str(source), "--out", str(tmp_path / "data"),
                                           "--assign-split", "val"]))
    checkpoint = torch.load(REFERENCE / "model.pt", weights_only=True)
    settings = common.preprocess_settings(checkpoint["preprocess"])
    preprocess.main(preprocess.parse_args([
        "--data", str(tmp_path / "data"), "--out", str(tmp_path / "cache"), "--cache-size", str(settings["cache_size"]),
        "--work-size", str(settings["work_size"]), "--crop-margin", str(settings["crop_margin"]),
        "--crop-fit", settings["crop_fit"],
        "--hair-removal", settings["hair_removal"], "--colour-constancy", settings["colour_constancy"],
        "--segmenter", "unet", "--segmenter-model", str(REFERENCE / "segmenter.pt")]))
    evaluate.main(evaluate.parse_args(["--run", str(REFERENCE), "--cache", str(tmp_path / "cache"), "--split", "val",
                                       "--bootstrap", "0", "--out-dir", str(tmp_path / "evaluated")]))
    expected = pd.read_csv(tmp_path / "evaluated" / "test_probs.csv").set_index("image_id")
    assert (expected["tta"] == 1).all()
    for row in rows.itertuples():  # each image with its own age, sex and site, as evaluate.py feeds them
        out = tmp_path / f"{row.image_id}.csv"
        predict.main(predict.parse_args([str(HAM / row.filename), "--age", str(row.age), "--sex", row.sex,
                                         "--site", row.localization, "--out", str(out)]))
        assert pd.read_csv(out)["malignancy_prob"][0] == pytest.approx(expected.loc[row.image_id, "prob"], abs=1e-5)


@pytest.mark.parametrize("damage, words", [
    ("missing", "model.pt: checkpoint not found"),
    ("truncated", "model.pt: not a loadable checkpoint"),
    ("tensor", "model.pt: holds a Tensor, not a checkpoint"),
    ("segmenter", "segmenter.pt: is not the segmenter"),
])
def test_a_damaged_model_folder_ends_with_one_line_naming_the_file(tmp_path, damage, words):
    copy = tmp_path / "reference"
    shutil.copytree(REFERENCE, copy)
    model = copy / "model.pt"
    if damage == "missing":
        model.unlink()
    elif damage == "truncated":
        model.write_bytes(model.read_bytes()[:100_000])
    elif damage == "tensor":
        torch.save(torch.zeros(3), model)
    else:
        segmenter = copy / "segmenter.pt"
        segmenter.write_bytes(segmenter.read_bytes()[:-10])
    image = HAM / real_rows(0, 1)["filename"].iloc[0]
    out = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--run", str(copy), str(image), "--out",
                          str(tmp_path / "p.csv")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and words in out.stderr, out.stderr
    assert not (tmp_path / "p.csv").exists()


def test_the_shipped_segmenter_finds_real_lesions_alike_in_a_batch_and_alone():
    """The U-Net of the folder on 24 real train/val images against their expert masks: a decoder or
    a loading step that went wrong would fall far below the 0.93 validation Dice the card states.
    Segmenting a batch at once (predict.py) gives the masks of one image at a time (preprocess.py)."""
    rows = real_rows(8, 16)
    settings = common.preprocess_settings(torch.load(REFERENCE / "model.pt", weights_only=True)["preprocess"])
    segmenter = REFERENCE / settings["segmenter"]
    images = [common.working_image(common.read_rgb(HAM / f), settings["work_size"])[0] for f in rows["filename"]]
    batched = common.learned_lesion_masks(images, segmenter, settings["segmenter_sha256"])
    alone = [common.learned_lesion_masks([image], segmenter, settings["segmenter_sha256"])[0] for image in images]
    assert all((a == b).all() and ok_a == ok_b for (a, ok_a), (b, ok_b) in zip(batched, alone))
    import cv2
    truths = [cv2.resize(common.read_mask(HAM / f).astype(np.uint8), image.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
              for f, image in zip(rows["mask"], images)]  # the expert masks are drawn at 600x450
    dice = [preprocess.dice_jaccard(mask, truth)[0] for (mask, _), truth in zip(batched, truths)]
    assert np.mean(dice) > 0.88 and all(ok for _, ok in batched)
