"""threshold.py's extra operating point, evaluate.py's report and plots, predict.py on new images."""
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import common
import evaluate
import predict
import preprocess
import threshold


def is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and cv2.imread(str(path)) is not None


def test_specificity_target_is_the_most_sensitive_point_that_keeps_it(trained_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "val_probs.csv").write_bytes((trained_run / "val_probs.csv").read_bytes())
    threshold.main(threshold.parse_args(["--run", str(run), "--target-specificity", "0.8"]))
    t = json.loads((run / "thresholds.json").read_text())["thresholds"]["specificity_target"]
    val = pd.read_csv(run / "val_probs.csv")
    assert common.binary_metrics(val["label"], val["prob"], t)["specificity"] >= 0.8
    lower = val["prob"][val["prob"] < t]
    if len(lower):
        assert common.binary_metrics(val["label"], val["prob"], lower.max())["specificity"] < 0.8


def test_specificity_target_of_one_is_a_legitimate_edge(trained_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    val = pd.read_csv(trained_run / "val_probs.csv")
    # a benign image with the top score: only calling none malignant keeps specificity 1.0
    val.loc[val["prob"].idxmax(), "label"] = 0
    val.to_csv(run / "val_probs.csv", index=False)
    threshold.main(threshold.parse_args(["--run", str(run), "--target-specificity", "1.0"]))
    t = json.loads((run / "thresholds.json").read_text())["thresholds"]["specificity_target"]
    assert common.binary_metrics(val["label"], val["prob"], t)["specificity"] == 1.0


def test_evaluate_writes_report_calibration_and_gradcam(evaluated_run, tmp_path):
    evaluate.main(evaluate.parse_args(["--run", str(evaluated_run), "--out-dir", str(tmp_path), "--bootstrap", "50",
                                       "--gradcam", "3"]))
    for name in ("calibration.png", "gradcam.png", "confusion_matrix.png", "roc_curve.png", "pr_curve.png"):
        assert is_png(tmp_path / name), name
    report = (tmp_path / "report.md").read_text()
    assert "| recall_target |" in report and "![gradcam.png](gradcam.png)" in report
    assert "split `test`" in report


def test_gradcam_highlights_the_lesion_more_than_the_corners(trained_run, synthetic_cache):
    model, checkpoint = common.load_checkpoint(trained_run / "model.pt")
    index, arrays = common.load_cache(synthetic_cache)
    rows = index[index["malignant"] == 1]["row"].to_numpy()[:8]
    images = common.model_inputs(arrays, rows, "full", checkpoint["input_size"])
    import torch
    cams = common.gradcam_maps(model, images, checkpoint["normalisation"], torch.device("cpu"), "binary")
    assert cams.shape[0] == 8 and np.isfinite(cams).all() and cams.max() <= 1 + 1e-6 and cams.min() >= 0


def test_tta_is_repeatable_and_close_to_plain_predictions(evaluated_run, tmp_path):
    evaluate.main(evaluate.parse_args(["--run", str(evaluated_run), "--out-dir", str(tmp_path / "a"), "--bootstrap",
                                       "0", "--tta"]))
    evaluate.main(evaluate.parse_args(["--run", str(evaluated_run), "--out-dir", str(tmp_path / "b"), "--bootstrap",
                                       "0", "--tta"]))
    a = pd.read_csv(tmp_path / "a" / "test_probs.csv")
    plain = pd.read_csv(evaluated_run / "test_probs.csv")
    assert a.equals(pd.read_csv(tmp_path / "b" / "test_probs.csv"))
    assert not np.allclose(a["prob"], plain["prob"])  # the views do change the prediction
    assert np.corrcoef(a["prob"], plain["prob"])[0, 1] > 0.8


def test_predict_gives_evaluates_probability_for_a_training_image(evaluated_run, synthetic_data, tmp_path):
    evaluate.main(evaluate.parse_args(["--run", str(evaluated_run), "--split", "train", "--out-dir",
                                       str(tmp_path / "train"), "--bootstrap", "0"]))
    train_probs = pd.read_csv(tmp_path / "train" / "test_probs.csv").set_index("image_id")
    meta = pd.read_csv(synthetic_data / "metadata.csv").set_index("image_id")
    chosen = train_probs.index[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    files = [str(synthetic_data / meta.loc[i, "filename"]) for i in chosen]
    predict.main(predict.parse_args(["--run", str(evaluated_run), *files, str(broken), "--out",
                                     str(tmp_path / "pred.csv"), "--overlay", str(tmp_path / "overlays")]))
    pred = pd.read_csv(tmp_path / "pred.csv")
    assert len(pred) == 3  # the unreadable file is skipped, the rest predicted
    np.testing.assert_allclose(pred["malignancy_prob"], train_probs.loc[chosen, "prob"], atol=1e-5)
    # by default at recall_bound, the point whose recall held on new images
    t = json.loads((evaluated_run / "thresholds.json").read_text())["thresholds"]["recall_bound"]
    assert (pred["operating_point"] == "recall_bound").all() and (pred["tta"] == 0).all()
    assert (pred["decision"] == np.where(pred["malignancy_prob"] >= t, "malignant", "benign")).all()
    assert all(is_png(tmp_path / "overlays" / f"{i}.png") for i in chosen)


def test_predict_names_a_missing_operating_point(evaluated_run, synthetic_data):
    with pytest.raises(SystemExit) as exc:
        predict.main(predict.parse_args(["--run", str(evaluated_run), str(synthetic_data / "images"),
                                         "--operating-point", "nonsense"]))
    assert "thresholds.json" in str(exc.value) and "recall_target" in str(exc.value)


def test_evaluate_and_predict_prepare_images_as_the_model_was_trained(evaluated_run, synthetic_data,
                                                                     synthetic_cache, tmp_path):
    import torch
    no_hair_removal = tmp_path / "cache_hair_off"
    preprocess.main(preprocess.parse_args(["--data", str(synthetic_data), "--img-size", "64", "--out",
                                           str(no_hair_removal), "--hair-removal", "off", "--workers", "2"]))
    # a cache prepared otherwise than the model's training cache is refused, naming the setting
    with pytest.raises(SystemExit) as exc:
        evaluate.main(evaluate.parse_args(["--run", str(evaluated_run), "--cache", str(no_hair_removal),
                                           "--out-dir", str(tmp_path / "refused")]))
    assert "cache_key.json" in str(exc.value) and "hair_removal off (model: on)" in str(exc.value)
    assert not (tmp_path / "refused").exists()

    # the same weights, told they were trained without hair removal: predict.py then leaves hairs
    # in, and gives what evaluate.py gives on the cache built that way
    run = tmp_path / "run_hair_off"
    run.mkdir()
    (run / "thresholds.json").write_bytes((evaluated_run / "thresholds.json").read_bytes())
    checkpoint = torch.load(evaluated_run / "model.pt", weights_only=True)
    checkpoint["preprocess"] = json.loads((no_hair_removal / "cache_key.json").read_text())
    checkpoint["args"]["cache"] = str(no_hair_removal)
    torch.save(checkpoint, run / "model.pt")
    evaluate.main(evaluate.parse_args(["--run", str(run), "--split", "train", "--bootstrap", "0"]))
    expected = pd.read_csv(run / "test_probs.csv").set_index("image_id")
    index = pd.read_csv(synthetic_cache / "index.csv").set_index("image_id")  # built with hair removal on
    hairy = index[index["split"] == "train"].nlargest(3, "hair_fraction").index
    assert (index.loc[hairy, "hair_fraction"] > 0.01).all()
    meta = pd.read_csv(synthetic_data / "metadata.csv").set_index("image_id")
    files = [str(synthetic_data / meta.loc[i, "filename"]) for i in hairy]
    predict.main(predict.parse_args(["--run", str(run), *files, "--out", str(tmp_path / "off.csv")]))
    predict.main(predict.parse_args(["--run", str(evaluated_run), *files, "--out", str(tmp_path / "on.csv")]))
    off, on = pd.read_csv(tmp_path / "off.csv"), pd.read_csv(tmp_path / "on.csv")
    np.testing.assert_allclose(off["malignancy_prob"], expected.loc[hairy, "prob"], atol=1e-5)
    assert not np.allclose(off["malignancy_prob"], on["malignancy_prob"], atol=1e-5)


def test_a_dataset_of_two_sources_is_scored_per_source_too(evaluated_run, synthetic_cache, tmp_path):
    """The synthetic cache relabelled as two sources: metrics_by_source.csv holds each source's
    metrics, the same as scoring that source alone with --source."""
    import shutil
    from sklearn.metrics import roc_auc_score
    cache = tmp_path / "two_sources"
    shutil.copytree(synthetic_cache, cache)
    index = pd.read_csv(cache / "index.csv")
    index["source"] = np.where(np.arange(len(index)) % 3 == 0, "clinic_a", "clinic_b")
    index.to_csv(cache / "index.csv", index=False)
    evaluate.main(evaluate.parse_args(["--run", str(evaluated_run), "--cache", str(cache), "--out-dir",
                                       str(tmp_path / "both"), "--bootstrap", "50"]))
    by_source = pd.read_csv(tmp_path / "both" / "metrics_by_source.csv")
    probs = pd.read_csv(tmp_path / "both" / "test_probs.csv").merge(index[["image_id", "source"]], on="image_id")
    assert sorted(by_source["source"].unique()) == ["clinic_a", "clinic_b"]
    for name, rows in probs.groupby("source"):
        mine = by_source[by_source["source"] == name]
        assert (mine["n"] == len(rows)).all()
        assert mine["roc_auc"].iloc[0] == pytest.approx(roc_auc_score(rows["label"], rows["prob"]))
    evaluate.main(evaluate.parse_args(["--run", str(evaluated_run), "--cache", str(cache), "--source", "clinic_a",
                                       "--out-dir", str(tmp_path / "a"), "--bootstrap", "50"]))
    alone = pd.read_csv(tmp_path / "a" / "metrics.csv")
    pd.testing.assert_frame_equal(alone, by_source[by_source["source"] == "clinic_a"].drop(columns="source")
                                  .reset_index(drop=True))
    assert not (tmp_path / "a" / "metrics_by_source.csv").exists()
    with pytest.raises(SystemExit) as exc:
        evaluate.main(evaluate.parse_args(["--run", str(evaluated_run), "--cache", str(cache), "--source", "clinic_c",
                                           "--out-dir", str(tmp_path / "c")]))
    assert "has no source 'clinic_c' (its sources: clinic_a, clinic_b)" in str(exc.value)


def test_thresholds_chosen_on_augmented_probabilities_make_tta_the_default(evaluated_run, synthetic_data, tmp_path,
                                                                          capsys):
    """threshold.py records that its probabilities were test-time-augmented (evaluate.py's tta
    column); evaluate.py and predict.py then read images that way unless told --no-tta."""
    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    evaluate.main(evaluate.parse_args(["--run", str(run), "--split", "val", "--tta", "--bootstrap", "0",
                                       "--out-dir", str(run / "val_tta")]))
    assert (pd.read_csv(run / "val_tta" / "test_probs.csv")["tta"] == 1).all()
    assert json.loads((run / "thresholds.json").read_text())["tta"] is False  # chosen on train.py's plain ones
    threshold.main(threshold.parse_args(["--run", str(run), "--probs", str(run / "val_tta" / "test_probs.csv")]))
    assert json.loads((run / "thresholds.json").read_text())["tta"] is True

    evaluate.main(evaluate.parse_args(["--run", str(run), "--bootstrap", "0", "--out-dir", str(tmp_path / "default")]))
    evaluate.main(evaluate.parse_args(["--run", str(run), "--bootstrap", "0", "--out-dir", str(tmp_path / "plain"),
                                       "--no-tta"]))
    default, plain = (pd.read_csv(tmp_path / name / "test_probs.csv") for name in ("default", "plain"))
    assert (default["tta"] == 1).all() and (plain["tta"] == 0).all()
    np.testing.assert_allclose(plain["prob"], pd.read_csv(evaluated_run / "test_probs.csv")["prob"], atol=1e-6)

    meta = pd.read_csv(synthetic_data / "metadata.csv").set_index("image_id")
    chosen = default["image_id"][:3]
    files = [str(synthetic_data / meta.loc[i, "filename"]) for i in chosen]
    capsys.readouterr()
    predict.main(predict.parse_args(["--run", str(run), *files, "--out", str(tmp_path / "pred.csv")]))
    printed = capsys.readouterr().out
    pred = pd.read_csv(tmp_path / "pred.csv")
    assert (pred["tta"] == 1).all()
    np.testing.assert_allclose(pred["malignancy_prob"], default.set_index("image_id").loc[chosen, "prob"], atol=1e-5)
    # the terminal table: a line per image with its probability and decision
    assert any(line.split() == ["file", "probability", "decision"] for line in printed.splitlines())
    for row in pred.itertuples():
        # long paths are shortened from the left: the file's name is always there
        assert any(line.split()[0].endswith(Path(row.file).name) and line.split()[1] == f"{row.malignancy_prob:.3f}"
                   and " ".join(line.split()[2:]) == row.decision for line in printed.splitlines())
