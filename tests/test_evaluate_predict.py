"""threshold.py's extra operating point, evaluate.py's report and plots, predict.py on new images."""
import json

import cv2
import numpy as np
import pandas as pd
import pytest

import common
import evaluate
import predict
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
    images = common.model_inputs(arrays, rows, "full", checkpoint["img_size"])
    import torch
    cams = evaluate.gradcam_maps(model, images, checkpoint["normalisation"], torch.device("cpu"), "binary")
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
    t = json.loads((evaluated_run / "thresholds.json").read_text())["thresholds"]["recall_target"]
    assert (pred["decision"] == np.where(pred["malignancy_prob"] >= t, "malignant", "benign")).all()
    assert all(is_png(tmp_path / "overlays" / f"{i}.png") for i in chosen)


def test_predict_names_a_missing_operating_point(evaluated_run, synthetic_data):
    with pytest.raises(SystemExit) as exc:
        predict.main(predict.parse_args(["--run", str(evaluated_run), str(synthetic_data / "images"),
                                         "--operating-point", "nonsense"]))
    assert "thresholds.json" in str(exc.value) and "recall_target" in str(exc.value)
