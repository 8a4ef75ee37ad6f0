"""Site calibration: the exact recall bound, the recalibration rule, and calibrate.py with
predict.py / evaluate.py --clinic through their command lines on the synthetic run."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from test_bad_input import run_script

import common


def test_the_exact_bound_is_what_n_images_can_show():
    assert common.recall_lower_bound_exact(20, 20) == pytest.approx(0.025 ** (1 / 20))
    assert common.images_needed_for_bound(0.9) == 36
    assert common.recall_lower_bound_exact(36, 36) >= 0.9 > common.recall_lower_bound_exact(35, 35)
    assert common.recall_lower_bound_exact(46, 50) < 0.9 < 46 / 50  # a bound, below the observed recall


def test_exact_recall_bound_threshold_is_the_highest_that_certifies_the_target():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(200), np.zeros(300)].astype(int)
    probs = np.r_[rng.beta(5, 2, 200), rng.beta(2, 5, 300)]
    t = common.recall_bound_threshold_exact(labels, probs, 0.85)
    found = int((probs[labels == 1] >= t).sum())
    assert common.recall_lower_bound_exact(found, 200) >= 0.85 > common.recall_lower_bound_exact(found - 1, 200)
    # 20 malignant images cannot certify 0.90: every one of them found, and a warning
    few = np.r_[np.ones(20), np.zeros(80)].astype(int)
    few_probs = np.r_[rng.beta(5, 2, 20), rng.beta(2, 5, 80)]
    points, method, warnings = common.site_operating_points(few, few_probs, np.arange(100), 0.9)
    assert points["recall_bound"] == few_probs[:20].min()
    assert "exact binomial" in method and any("36 malignant images could certify 0.9" in w for w in warnings)


def test_recalibration_rule_and_its_effect_on_held_out_images():
    rng = np.random.default_rng(1)

    def site(n):  # an overconfident model: the true log-odds are half the model's
        model_logit = rng.normal(-1, 3, n)
        labels = (rng.random(n) < 1 / (1 + np.exp(-model_logit / 2))).astype(int)
        return labels, 1 / (1 + np.exp(-model_logit))

    small_labels, small_probs = site(120)
    small = common.fit_recalibration(small_labels, small_probs)
    assert small["method"] == "logistic on the logit" and 0.3 < small["slope"] < 0.8
    large_labels, large_probs = site(3000)
    large = common.fit_recalibration(large_labels, large_probs)
    assert large["method"] == "isotonic"
    held_labels, held_probs = site(3000)
    for calibration in (small, large):
        after = common.recalibrated(held_probs, calibration)
        assert np.all(np.diff(after[np.argsort(held_probs)]) >= -1e-12)  # monotone: rankings kept
        assert common.calibration_errors(held_labels, after)[1] < common.calibration_errors(held_labels, held_probs)[1] / 2


@pytest.fixture(scope="module")
def calibrated_run(trained_run, synthetic_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("calibrated") / "run"
    shutil.copytree(trained_run, run)
    result = run_script("calibrate.py", "--run", run, "--data", synthetic_data, "--name", "site_a",
                        "--split", "test", "--target-specificity", "0.8")
    assert result.returncode == 0, result.stderr
    return run, result.stdout


def test_calibrate_writes_the_sites_points_and_probability(calibrated_run, synthetic_data):
    run, stdout = calibrated_run
    folder = run / "clinics" / "site_a"
    assert sorted(p.name for p in folder.iterdir()) == ["calibration.json", "reliability.png", "site_probs.csv",
                                                        "thresholds.json"]
    points = json.loads((folder / "thresholds.json").read_text())
    test_rows = pd.read_csv(synthetic_data / "metadata.csv").query("split == 'test'")
    probs = pd.read_csv(folder / "site_probs.csv")
    assert sorted(probs["image_id"]) == sorted(test_rows["image_id"]) and points["images"] == len(test_rows)
    assert points["malignant"] == int(test_rows["malignant"].sum())
    assert set(points["thresholds"]) == {"default", "best_f1", "recall_target", "recall_bound", "specificity_target"}
    # chosen on these images: recall_target's site recall reaches 0.9, specificity_target's specificity 0.8
    assert points["site_metrics"]["recall_target"]["recall"] >= 0.9
    assert points["site_metrics"]["specificity_target"]["specificity"] >= 0.8
    assert "exact binomial" in points["recall_bound_method"]  # a few dozen malignant images
    calibration = json.loads((folder / "calibration.json").read_text())
    assert calibration["method"] == "logistic on the logit" and calibration["fitted_on"] == len(test_rows)
    assert np.allclose(probs["calibrated_prob"], common.recalibrated(probs["prob"], calibration))
    assert "ROC-AUC" in stdout and "warning:" in stdout  # too few malignant images to certify 0.90


def test_predict_and_evaluate_apply_the_clinic(calibrated_run, synthetic_data, tmp_path):
    run, _ = calibrated_run
    folder = run / "clinics" / "site_a"
    points = json.loads((folder / "thresholds.json").read_text())
    calibration = json.loads((folder / "calibration.json").read_text())
    images = sorted((synthetic_data / "images").iterdir())[:3]
    out = tmp_path / "p.csv"
    result = run_script("predict.py", "--run", run, "--clinic", "site_a", *images, "--out", out)
    assert result.returncode == 0, result.stderr
    rows = pd.read_csv(out)
    assert (rows["threshold"] == points["thresholds"]["recall_bound"]).all()
    assert np.allclose(rows["malignancy_prob"], common.recalibrated(rows["model_prob"], calibration))
    assert ((rows["model_prob"] >= rows["threshold"]) == (rows["decision"] == "malignant")).all()
    plain = run_script("predict.py", "--run", run, *images, "--out", tmp_path / "plain.csv")
    assert plain.returncode == 0 and "model_prob" not in pd.read_csv(tmp_path / "plain.csv")  # nothing changes without it
    assert np.allclose(pd.read_csv(tmp_path / "plain.csv")["malignancy_prob"], rows["model_prob"], atol=1e-6)

    result = run_script("evaluate.py", "--run", run, "--clinic", "site_a", "--bootstrap", "0",
                        "--out-dir", tmp_path / "eval")
    assert result.returncode == 0, result.stderr
    metrics = pd.read_csv(tmp_path / "eval" / "metrics.csv").set_index("operating_point")
    assert metrics.loc["recall_bound", "threshold"] == pytest.approx(points["thresholds"]["recall_bound"])
    assert "calibrated_prob" in pd.read_csv(tmp_path / "eval" / "test_probs.csv")


@pytest.mark.parametrize("args, words", [
    (["--name", "../escape"], "is not a clinic name"),
    (["--split", "nosuchsplit"], "has no rows in split nosuchsplit"),
])
def test_calibrate_bad_input_is_one_line_and_writes_nothing(calibrated_run, synthetic_data, args, words):
    run, _ = calibrated_run
    before = sorted(p.name for p in (run / "clinics").iterdir())
    result = run_script("calibrate.py", "--run", run, "--data", synthetic_data, *args)
    assert result.returncode == 1 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (run / "clinics").iterdir()) == before


def test_an_unknown_clinic_is_one_line_naming_the_known_ones(calibrated_run, synthetic_data):
    run, _ = calibrated_run
    image = sorted((synthetic_data / "images").iterdir())[0]
    result = run_script("predict.py", "--run", run, "--clinic", "site_b", image)
    assert result.returncode == 1 and "calibrated: site_a" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_damaged_calibration_is_one_line_naming_it(calibrated_run, synthetic_data, tmp_path):
    run, _ = calibrated_run
    damaged = tmp_path / "run"
    shutil.copytree(run, damaged)
    (damaged / "clinics" / "site_a" / "calibration.json").write_text('{"method": "magic"}')
    image = sorted((synthetic_data / "images").iterdir())[0]
    result = run_script("predict.py", "--run", damaged, "--clinic", "site_a", image, "--out", tmp_path / "p.csv")
    assert result.returncode == 1 and "calibration.json" in result.stderr and "not a recalibration" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.csv").exists()
