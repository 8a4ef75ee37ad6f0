"""ensemble.py: an ensemble folder behaves as a run whose probability is its members' mean."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

import ensemble
import evaluate
import predict
import threshold
import train


@pytest.fixture(scope="module")
def members(trained_run, synthetic_cache, tmp_path_factory):
    """The session's tiny run and a second one trained with another seed and augmentation,
    side by side in one runs folder."""
    runs = tmp_path_factory.mktemp("ensemble_runs")
    shutil.copytree(trained_run, runs / "a")
    train.main(train.parse_args(["--cache", str(synthetic_cache), "--run-dir", str(runs / "b"), "--arch",
                                 "efficientnet_lite0", "--epochs", "2", "--batch-size", "32", "--aug", "basic",
                                 "--seed", "3"]))
    threshold.main(threshold.parse_args(["--run", str(runs / "b")]))
    for name in ("a", "b"):
        evaluate.main(evaluate.parse_args(["--run", str(runs / name), "--bootstrap", "0"]))
    return runs


@pytest.fixture(scope="module")
def ensemble_run(members):
    run = members / "ab"
    ensemble.main(ensemble.parse_args(["--run-dir", str(run), str(members / "a"), str(members / "b")]))
    threshold.main(threshold.parse_args(["--run", str(run)]))
    evaluate.main(evaluate.parse_args(["--run", str(run), "--bootstrap", "0"]))
    return run


def mean_of_members(members, filename):
    a, b = (pd.read_csv(members / name / filename).set_index("image_id").sort_index() for name in ("a", "b"))
    assert not np.allclose(a["prob"], b["prob"])  # two different models, or the test proves nothing
    return (a["prob"] + b["prob"]) / 2


def test_validation_probabilities_are_the_members_mean(members, ensemble_run):
    val = pd.read_csv(ensemble_run / "val_probs.csv").set_index("image_id").sort_index()
    np.testing.assert_allclose(val["prob"], mean_of_members(members, "val_probs.csv"), atol=1e-6)
    summary = json.loads((ensemble_run / "members.json").read_text())
    assert summary["members"] == ["../a", "../b"] and summary["task"] == "binary"
    assert 0.5 <= summary["val_score"] <= 1


def test_evaluate_runs_every_member_and_averages(members, ensemble_run):
    test = pd.read_csv(ensemble_run / "test_probs.csv").set_index("image_id").sort_index()
    np.testing.assert_allclose(test["prob"], mean_of_members(members, "test_probs.csv"), atol=1e-6)
    assert "mean probability of 2 models" in (ensemble_run / "report.md").read_text()
    metrics = pd.read_csv(ensemble_run / "metrics.csv").set_index("operating_point")
    thresholds = json.loads((ensemble_run / "thresholds.json").read_text())["thresholds"]
    assert metrics.loc["recall_target", "threshold"] == pytest.approx(thresholds["recall_target"])


def test_ensemble_folder_can_move_with_its_members(members, ensemble_run, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(members, moved)
    evaluate.main(evaluate.parse_args(["--run", str(moved / "ab"), "--bootstrap", "0", "--out-dir",
                                       str(tmp_path / "out")]))
    assert pd.read_csv(tmp_path / "out" / "test_probs.csv").equals(pd.read_csv(ensemble_run / "test_probs.csv"))


def test_predict_with_an_ensemble_gives_the_mean(members, ensemble_run, synthetic_data, tmp_path):
    files = [synthetic_data / name for name in pd.read_csv(synthetic_data / "metadata.csv")["filename"][:3]]
    for name in ("a", "b", "ab"):
        predict.main(predict.parse_args(["--run", str(members / name), *map(str, files), "--out",
                                         str(tmp_path / f"{name}.csv")]))
    a, b, ab = (pd.read_csv(tmp_path / f"{name}.csv")["malignancy_prob"] for name in ("a", "b", "ab"))
    np.testing.assert_allclose(ab, (a + b) / 2, atol=1e-6)


def test_members_must_share_task_and_images(members, tmp_path):
    other_task = tmp_path / "c"
    shutil.copytree(members / "b", other_task)
    config = json.loads((other_task / "config.json").read_text())
    config["args"]["task"] = "multiclass"
    (other_task / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="an ensemble averages one task"):
        ensemble.main(ensemble.parse_args(["--run-dir", str(tmp_path / "e"), str(members / "a"), str(other_task)]))

    fewer_images = tmp_path / "d"
    shutil.copytree(members / "b", fewer_images)
    val = pd.read_csv(fewer_images / "val_probs.csv")
    val.iloc[1:].to_csv(fewer_images / "val_probs.csv", index=False)
    with pytest.raises(SystemExit, match="d/val_probs.csv: holds other validation images or labels"):
        ensemble.main(ensemble.parse_args(["--run-dir", str(tmp_path / "e"), str(members / "a"), str(fewer_images)]))
    assert not (tmp_path / "e" / "val_probs.csv").exists()


def test_gradcam_asks_for_a_single_model(ensemble_run, tmp_path):
    with pytest.raises(SystemExit, match="not an ensemble"):
        evaluate.main(evaluate.parse_args(["--run", str(ensemble_run), "--gradcam", "2", "--out-dir", str(tmp_path)]))
