"""The steps chained as the Makefile chains them, on synthetic data."""
import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT
from sklearn.metrics import roc_auc_score

import common
import evaluate
import preprocess
import threshold
import train

SCRIPTS = ["fetch_data.py", "preprocess.py", "train.py", "ensemble.py", "threshold.py", "evaluate.py", "predict.py",
           "calibrate.py", "export_model.py", "train_segmenter.py", "app.py"]


def run_script(script, *args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_help(script):
    out = run_script(script, "--help")
    assert out.returncode == 0 and "usage:" in out.stdout and "Example" in out.stdout


@pytest.mark.parametrize("args", [["preprocess.py", "--data", "no/such/dir"],
                                  ["train.py", "--cache", "no/such/cache", "--run-dir", "unused"],
                                  ["threshold.py", "--run", "no/such/run"],
                                  ["ensemble.py", "--run-dir", "unused", "no/such/run1", "no/such/run2"],
                                  ["evaluate.py", "--run", "no/such/run"]])
def test_missing_input_is_a_one_line_error(args, tmp_path):
    out = run_script(*args, cwd=tmp_path)  # a run's lock file lands beside its folder: not in the repo
    assert out.returncode == 1
    assert out.stderr.startswith("error: no/such/") and out.stderr.count("\n") == 1, out.stderr


BAD_FLAGS = [
    (["train.py", "--cache", "c", "--run-dir", "r", "--epochs", "0"], "--epochs"),
    (["train.py", "--cache", "c", "--run-dir", "r", "--lr", "-1"], "--lr"),
    (["train.py", "--cache", "c", "--run-dir", "r", "--threads", "-1"], "--threads"),
    (["train.py", "--cache", "c", "--run-dir", "r", "--batch-size", "0"], "--batch-size"),
    (["train.py", "--cache", "c", "--run-dir", "r", "--pos-weight", "-3"], "--pos-weight"),
    (["train.py", "--cache", "c", "--run-dir", "r", "--patience", "0"], "--patience"),
    (["train.py", "--cache", "c", "--run-dir", "r", "--img-size", "-5"], "--img-size"),
    (["train.py", "--cache", "c", "--run-dir", "r", "--lr", "nan"], "--lr"),
    (["preprocess.py", "--data", "d", "--img-size", "-5"], "--img-size"),
    (["preprocess.py", "--data", "d", "--workers", "0"], "--workers"),
    (["fetch_data.py", "--synthetic", "10", "--out", "o"], "--synthetic"),
    (["fetch_data.py", "--from-dir", "d", "--out", "o", "--limit", "-1"], "--limit"),
    (["fetch_data.py", "--synthetic", "30", "--out", "o", "--val-frac", "1.5"], "--val-frac"),
    (["evaluate.py", "--run", "r", "--bootstrap", "-5"], "--bootstrap"),
    (["threshold.py", "--run", "r", "--target-recall", "0"], "--target-recall"),
    (["predict.py", "--run", "r", "x.png", "--tta", "--nonsense"], "--nonsense"),
]


@pytest.mark.parametrize("args, flag", BAD_FLAGS)
def test_a_bad_flag_is_refused_when_parsed(args, flag):
    module = __import__(args[0].removesuffix(".py"))
    with pytest.raises(SystemExit) as exc:
        module.parse_args(args[1:])
    assert str(exc.value).startswith("error: ") and flag in str(exc.value) and "\n" not in str(exc.value)


def test_a_bad_flag_is_a_one_line_error_on_the_command_line(tmp_path):
    """One bad flag per script through the real command line, all at once (imports dominate)."""
    chosen = {args[0]: (args, flag) for args, flag in BAD_FLAGS}.values()
    runs = [(flag, subprocess.Popen([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=tmp_path, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)) for args, flag in chosen]
    for flag, process in runs:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 1
        assert stderr.startswith("error: ") and flag in stderr and stderr.count("\n") == 1, stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_preprocess_cache_holds_every_image(synthetic_data, synthetic_cache):
    meta = pd.read_csv(synthetic_data / "metadata.csv")
    index, arrays = common.load_cache(synthetic_cache)
    assert index["image_id"].tolist() == meta["image_id"].tolist()
    assert arrays["full"].shape == (len(meta), 64, 64, 3) and arrays["crop"].shape == arrays["full"].shape
    assert set(np.unique(arrays["mask"])) <= {0, 1}
    assert index["mask_ok"].all()
    assert all((synthetic_cache / "masks" / f"{i}.png").is_file() for i in index["image_id"])
    for column in ("mask_area", "hair_fraction", "crop_x0", "crop_y0", "crop_x1", "crop_y1"):
        assert column in index.columns


def test_preprocess_redoes_nothing_unless_a_setting_changes(synthetic_data, tmp_path, capsys):
    out = tmp_path / "cache"
    args = ["--data", str(synthetic_data), "--img-size", "24", "--out", str(out), "--workers", "1"]
    preprocess.main(preprocess.parse_args(args))
    stamp = (out / "index.csv").stat().st_mtime_ns
    preprocess.main(preprocess.parse_args(args + ["--crop-fit", "inside"]))  # the default, as caches before it
    assert "up to date" in capsys.readouterr().out
    assert (out / "index.csv").stat().st_mtime_ns == stamp
    preprocess.main(preprocess.parse_args(args + ["--crop-margin", "0.3"]))
    assert json.loads((out / "cache_key.json").read_text())["crop_margin"] == 0.3
    assert (out / "index.csv").stat().st_mtime_ns != stamp


def test_a_padded_crop_cache_is_what_predict_prepares_from_its_key(synthetic_data, tmp_path):
    out = tmp_path / "cache"
    preprocess.main(preprocess.parse_args(["--data", str(synthetic_data), "--img-size", "24", "--out", str(out),
                                           "--workers", "1", "--crop-margin", "0.6", "--crop-fit", "pad"]))
    key = json.loads((out / "cache_key.json").read_text())
    assert key["crop_fit"] == "pad"
    index, arrays = common.load_cache(out)
    beyond = (index["crop_x0"] < 0) | (index["crop_y0"] < 0)
    assert beyond.any()  # a margin of 0.6 takes some synthetic lesions' boxes past the image's edges
    settings = common.preprocess_settings(key)  # what a model trained on this cache keeps, predict.py reads
    meta = pd.read_csv(synthetic_data / "metadata.csv").set_index("image_id")
    for row in index[beyond].head(2).itertuples():
        prepared = common.preprocess_image(synthetic_data / meta.loc[row.image_id, "filename"], **settings)
        assert (prepared["crop"] == arrays["crop"][row.row]).all()
        assert (prepared["crop"][0] == 0).all() or (prepared["crop"][:, 0] == 0).all()  # black beyond the edge


def test_preprocess_reports_an_unreadable_image_and_goes_on(synthetic_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    meta = pd.read_csv(data / "metadata.csv").head(30)
    meta.to_csv(data / "metadata.csv", index=False)
    (data / meta["filename"][3]).write_bytes(b"\x89PNG broken")
    preprocess.main(preprocess.parse_args(["--data", str(data), "--img-size", "24", "--out",
                                           str(tmp_path / "cache"), "--workers", "1"]))
    printed = capsys.readouterr().out
    assert f"{meta['filename'][3]}: not a readable image" in printed and "(1 failed)" in printed
    index, _ = common.load_cache(tmp_path / "cache")
    assert len(index) == 29 and meta["image_id"][3] not in set(index["image_id"])


def test_model_trains_its_loss_falls_and_it_learns(trained_run):
    history = pd.read_csv(trained_run / "history.csv")
    assert len(history) == 4
    assert history["train_loss"].iloc[-1] < 0.8 * history["train_loss"].iloc[0]
    assert history["val_auc"].max() > 0.7  # the synthetic classes are learnably different


def test_run_folder_holds_a_rebuildable_checkpoint(trained_run, synthetic_cache):
    for name in ("model.pt", "last.pt", "history.csv", "val_probs.csv", "config.json", "thresholds.json"):
        assert (trained_run / name).is_file(), name
    model, checkpoint = common.load_checkpoint(trained_run / "model.pt")
    assert checkpoint["arch"] == "efficientnet_lite0" and checkpoint["input_size"] == 64
    index, arrays = common.load_cache(synthetic_cache)
    val = pd.read_csv(trained_run / "val_probs.csv")
    assert set(val["image_id"]) == set(index.loc[index["split"] == "val", "image_id"])
    # the saved probabilities are the checkpoint's own
    rows = index.set_index("image_id").loc[val["image_id"], "row"]
    probs, _ = common.predict_probs(model, common.model_inputs(arrays, rows, checkpoint["input"]),
                                    checkpoint["normalisation"], torch.device("cpu"))
    np.testing.assert_allclose(probs, val["prob"], atol=1e-5)
    config = json.loads((trained_run / "config.json").read_text())
    assert config["args"]["arch"] == "efficientnet_lite0" and "torch" in config["versions"]


def test_resume_continues_exactly(synthetic_cache, tmp_path, monkeypatch):
    args = ["--cache", str(synthetic_cache), "--arch", "resnet18", "--no-pretrained", "--epochs", "3",
            "--batch-size", "32", "--aug", "full", "--seed", "5"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(train.parse_args(args + ["--run-dir", str(straight)]))

    real_epoch = train.train_one_epoch

    def interrupted_in_third_epoch(*a, epoch, **kw):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(*a, epoch=epoch, **kw)

    monkeypatch.setattr(train, "train_one_epoch", interrupted_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.main(train.parse_args(args + ["--run-dir", str(resumed)]))
    assert len(pd.read_csv(resumed / "history.csv")) == 2
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    train.main(train.parse_args(args + ["--run-dir", str(resumed), "--resume"]))
    a, b = pd.read_csv(straight / "history.csv"), pd.read_csv(resumed / "history.csv")
    np.testing.assert_allclose(a[["train_loss", "val_loss", "val_auc"]], b[["train_loss", "val_loss", "val_auc"]],
                               rtol=1e-4)
    np.testing.assert_allclose(pd.read_csv(straight / "val_probs.csv")["prob"],
                               pd.read_csv(resumed / "val_probs.csv")["prob"], atol=1e-4)


def test_threshold_needs_only_validation_probabilities(trained_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run / "val_probs.csv", run)  # no model, no test file
    threshold.main(threshold.parse_args(["--run", str(run), "--target-recall", "0.9"]))
    chosen = json.loads((run / "thresholds.json").read_text())
    val = pd.read_csv(run / "val_probs.csv")
    t = chosen["thresholds"]["recall_target"]
    assert common.binary_metrics(val["label"], val["prob"], t)["recall"] >= 0.9
    # it is the highest such threshold: any higher one misses the target
    higher = val["prob"][val["prob"] > t]
    if len(higher):
        assert common.binary_metrics(val["label"], val["prob"], higher.min())["recall"] < 0.9
    f1 = {p: common.binary_metrics(val["label"], val["prob"], p)["f1"] for p in val["prob"]}
    assert common.binary_metrics(val["label"], val["prob"], chosen["thresholds"]["best_f1"])["f1"] == \
        pytest.approx(max(f1.values()))
    assert (run / "pr_curve_val.png").is_file()


def test_evaluate_writes_metrics_and_valid_plots(evaluated_run, synthetic_cache):
    metrics = pd.read_csv(evaluated_run / "metrics.csv")
    assert metrics["operating_point"].tolist() == ["default", "best_f1", "recall_target", "recall_bound"]
    test = pd.read_csv(evaluated_run / "test_probs.csv")
    index, _ = common.load_cache(synthetic_cache)
    assert set(test["image_id"]) == set(index.loc[index["split"] == "test", "image_id"])
    assert metrics["roc_auc"].nunique() == 1
    assert metrics["roc_auc"].iloc[0] == pytest.approx(roc_auc_score(test["label"], test["prob"]))
    for metric in evaluate.METRICS:
        assert (metrics[f"{metric}_lo"] <= metrics[metric] + 1e-9).all()
        assert (metrics[metric] <= metrics[f"{metric}_hi"] + 1e-9).all()
    for name in ("confusion_matrix.png", "roc_curve.png", "pr_curve.png", "pr_curve_val.png"):
        path = evaluated_run / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        image = cv2.imread(str(path))
        assert image is not None and min(image.shape[:2]) > 200, name


def test_evaluating_twice_gives_the_same_probabilities(evaluated_run, tmp_path):
    evaluate.main(evaluate.parse_args(["--run", str(evaluated_run), "--out-dir", str(tmp_path), "--bootstrap", "0"]))
    assert (tmp_path / "test_probs.csv").read_text() == (evaluated_run / "test_probs.csv").read_text()


def test_score_masks_on_synthetic_ground_truth(synthetic_data, synthetic_cache, capsys):
    preprocess.main(preprocess.parse_args(["--data", str(synthetic_data), "--img-size", "64", "--out",
                                           str(synthetic_cache), "--score-masks", str(synthetic_data / "masks"),
                                           "--overlay-sheet", "10"]))
    summary = json.loads((synthetic_cache / "segmentation_summary.json").read_text())
    scores = pd.read_csv(synthetic_cache / "segmentation_scores.csv")
    assert summary["images"] == len(scores) == 240
    assert summary["mean_dice"] == pytest.approx(scores["dice"].mean())
    for dx, group in scores.groupby("dx"):
        assert summary["by_dx"][dx]["mean_dice"] == pytest.approx(group["dice"].mean())
    assert sum(s["images"] for s in summary["by_split"].values()) == 240
    assert summary["mean_dice"] > 0.9 and summary["share_jaccard_below_0.65"] < 0.05
    assert (scores["jaccard"] <= scores["dice"] + 1e-12).all()
    for sheet in ("worst_overlays.png", "overlays.png"):
        assert cv2.imread(str(synthetic_cache / sheet)) is not None


def test_segmentation_meets_its_targets_on_ph2(tmp_path):
    """The issue's targets on the 100 PH2 images with expert masks: mean Dice >= 0.88 and at most
    10% of images with Jaccard below 0.65 (the plain Otsu recipe scores about 0.69)."""
    from conftest import SHARED_DATA
    import fetch_data
    data = tmp_path / "ph2"
    fetch_data.main(fetch_data.parse_args(["--from-dir", str(SHARED_DATA / "ph2"), "--out", str(data),
                                           "--assign-split", "test"]))
    # no --score-masks: the expert masks came with the data (labels.csv's mask column)
    preprocess.main(preprocess.parse_args(["--data", str(data), "--img-size", "32", "--out", str(tmp_path / "c")]))
    summary = json.loads((tmp_path / "c" / "segmentation_summary.json").read_text())
    assert summary["images"] == 100 and summary["by_dx"]["mel"]["images"] == 20
    assert summary["mean_dice"] >= 0.88
    assert summary["share_jaccard_below_0.65"] <= 0.10


def test_colour_constancy_changes_the_cached_images_not_the_masks(synthetic_data, synthetic_cache, tmp_path):
    out = tmp_path / "synthetic_64_sog"
    preprocess.main(preprocess.parse_args(["--data", str(synthetic_data), "--img-size", "64", "--out", str(out),
                                           "--colour-constancy", "shades_of_gray", "--workers", "2"]))
    assert json.loads((out / "cache_key.json").read_text())["colour_constancy"] == "shades_of_gray"
    plain, corrected = common.load_cache(synthetic_cache)[1], common.load_cache(out)[1]
    assert (plain["mask"] == corrected["mask"]).all()
    assert not (plain["full"] == corrected["full"]).all() and not (plain["crop"] == corrected["crop"]).all()


def test_recall_bound_keeps_its_margin_and_widens_it_for_few_lesions():
    """recall_bound's lower 95% bound comes from resampling lesions. 2,000 malignant images whose
    scores cluster in 20 lesions of 100: counted as 2,000 lesions of one image, the point sits
    about 1.3 recall points above the target; counted as the 20 lesions they are, images of a
    lesion rise and fall together and the margin must be far larger. Never above recall_target."""
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(2000, int), np.zeros(2000, int)]
    lesion_effect = np.repeat(rng.normal(1.5, 1.0, 20), 100)
    probs = np.r_[1 / (1 + np.exp(-(lesion_effect + rng.normal(0, 1, 2000)))), rng.beta(2, 5, 2000)]
    recall_at = {}
    for name, lesions in {"many": np.arange(4000), "few": np.r_[np.arange(2000) // 100, 100 + np.arange(2000)]}.items():
        t = common.recall_bound_threshold(labels, probs, lesions.astype(str), 0.9, 1000, 0)
        assert t <= common.recall_target_threshold(labels, probs, 0.9)
        recall_at[name] = common.binary_metrics(labels, probs, t)["recall"]
    assert 0.905 < recall_at["many"] < 0.925
    assert recall_at["few"] > recall_at["many"] + 0.02


def test_threshold_takes_other_validation_probabilities_but_never_other_images(evaluated_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(evaluated_run / "val_probs.csv", run)
    val = pd.read_csv(run / "val_probs.csv")
    shifted = val.assign(prob=val["prob"] ** 2)  # stands in for test-time-augmented probabilities
    shifted.to_csv(tmp_path / "tta.csv", index=False)
    threshold.main(threshold.parse_args(["--run", str(run), "--probs", str(tmp_path / "tta.csv")]))
    chosen = json.loads((run / "thresholds.json").read_text())
    assert chosen["chosen_on"] == str(tmp_path / "tta.csv")
    assert chosen["thresholds"]["recall_target"] == pytest.approx(
        common.recall_target_threshold(shifted["label"].to_numpy(), shifted["prob"].to_numpy(), 0.9))
    with pytest.raises(SystemExit, match="does not hold the validation images"):
        threshold.main(threshold.parse_args(["--run", str(run), "--probs", str(evaluated_run / "test_probs.csv")]))


@pytest.mark.parametrize("hair, segmenter, colour, crop_fit", [
    ("on", "unet", "shades_of_gray", "pad"), ("off", "classical", "none", "inside"), ("legacy", "unet", "none", "pad"),
    ("on", "classical", "shades_of_gray", "inside")])
def test_make_names_a_cache_as_preprocess_does(hair, segmenter, colour, crop_fit):
    """The Makefile's cache names (CACHE_SUFFIX) follow preprocess.py's default_cache_dir."""
    import shlex
    out = subprocess.run(["make", "-n", "preprocess", "DATA=mine", "PYTHON=python3", f"HAIR={hair}",
                          f"SEGMENTER={segmenter}", f"COLOUR={colour}", f"CROP_FIT={crop_fit}", "CACHE_SIZE=96"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    line = next(line for line in out.replace("\\\n", " ").splitlines() if "preprocess.py" in line)
    words = shlex.split(line)
    expected = preprocess.default_cache_dir(preprocess.parse_args(
        ["--data", "data/mine", "--cache-size", "96", "--hair-removal", hair, "--segmenter", segmenter,
         "--colour-constancy", colour, "--crop-fit", crop_fit]))
    assert words[words.index("--out") + 1] == str(expected)
