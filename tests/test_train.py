"""train.py's recipe options: tasks, losses, sampler, precision, distributed training."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT

import common
import evaluate
import threshold
import train


def test_weighted_bce_uses_the_training_imbalance():
    rows = pd.DataFrame({"malignant": [1] * 20 + [0] * 80, "dx": ["mel"] * 20 + ["nv"] * 80})
    criterion, outputs, targets = train.loss_and_targets(train.parse_args(["--cache", "c", "--run-dir", "r",
                                                                           "--loss", "wbce"]), rows)
    assert outputs == 1 and criterion.pos_weight.item() == pytest.approx(4.0)
    criterion, outputs, _ = train.loss_and_targets(train.parse_args(["--cache", "c", "--run-dir", "r", "--loss",
                                                                     "wbce", "--pos-weight", "2.5"]), rows)
    assert criterion.pos_weight.item() == pytest.approx(2.5)
    criterion, outputs, _ = train.loss_and_targets(train.parse_args(["--cache", "c", "--run-dir", "r",
                                                                     "--loss", "ce"]), rows)
    assert outputs == 2 and isinstance(criterion, torch.nn.CrossEntropyLoss)


def test_balanced_class_weights_for_multiclass():
    rows = pd.DataFrame({"malignant": 0, "dx": ["nv"] * 70 + ["mel"] * 20 + ["df"] * 10})
    args = train.parse_args(["--cache", "c", "--run-dir", "r", "--task", "multiclass", "--loss", "ce",
                             "--class-weights", "balanced"])
    criterion, outputs, targets = train.loss_and_targets(args, rows)
    assert outputs == 7
    weight = dict(zip(common.DX_CODES, criterion.weight.tolist()))
    assert weight["df"] / weight["nv"] == pytest.approx(7.0)


def test_balanced_sampler_draws_classes_equally_and_orders_are_repeatable():
    targets = torch.tensor([0] * 900 + [1] * 100)
    order = train.epoch_order(targets, "balanced", seed=0, epoch=0)
    assert len(order) == 1000 and targets[order].float().mean().item() == pytest.approx(0.5, abs=0.06)
    plain = train.epoch_order(targets, "none", seed=0, epoch=3)
    assert sorted(plain.tolist()) == list(range(1000))
    assert torch.equal(plain, train.epoch_order(targets, "none", seed=0, epoch=3))
    assert not torch.equal(plain, train.epoch_order(targets, "none", seed=0, epoch=4))


def test_multiclass_run_scores_malignancy_as_the_sum_of_malignant_classes(synthetic_cache, tmp_path):
    run = tmp_path / "multi"
    train.main(train.parse_args(["--cache", str(synthetic_cache), "--run-dir", str(run), "--task", "multiclass",
                                 "--epochs", "2", "--aug", "basic", "--sampler", "balanced", "--class-weights",
                                 "balanced", "--optimizer", "adamw", "--weight-decay", "0.01"]))
    val = pd.read_csv(run / "val_probs.csv")
    class_columns = [f"prob_{c}" for c in common.DX_CODES]
    np.testing.assert_allclose(val[class_columns].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(val["prob"], val[["prob_mel", "prob_bcc", "prob_akiec"]].sum(axis=1), atol=1e-5)
    history = pd.read_csv(run / "history.csv")
    assert history["val_bal_acc"].notna().all()
    assert torch.load(run / "model.pt", weights_only=True)["task"] == "multiclass"
    threshold.main(threshold.parse_args(["--run", str(run)]))
    evaluate.main(evaluate.parse_args(["--run", str(run), "--bootstrap", "20"]))
    test = pd.read_csv(run / "test_probs.csv")
    assert set(class_columns) <= set(test.columns)
    per_class = pd.read_csv(run / "multiclass_metrics.csv").set_index("class")
    from sklearn.metrics import balanced_accuracy_score
    predicted = test[class_columns].to_numpy().argmax(axis=1)
    truth = [common.DX_CODES.index(dx) for dx in test["dx"]]
    assert per_class.loc["macro", "recall"] == pytest.approx(balanced_accuracy_score(truth, predicted))
    macro = per_class.loc["macro"]
    assert macro["recall_lo"] <= macro["recall"] <= macro["recall_hi"] and macro["recall_lo"] < macro["recall_hi"]
    assert list(per_class.index[:7]) == list(common.DX_CODES)
    assert (run / "confusion_matrix_7class.png").is_file()


def test_patience_stops_early(synthetic_cache, tmp_path, monkeypatch):
    scores = iter([0.8, 0.7, 0.75, 0.9, 0.95])

    def fake_validate(*args, **kwargs):
        score = next(scores, 0.5)
        return np.full(len(args[3]), 0.5), None, {"val_loss": 1.0, "val_auc": score, "val_bal_acc": float("nan"),
                                                   "val_score": score}

    monkeypatch.setattr(train, "validate", fake_validate)
    monkeypatch.setattr(train, "train_one_epoch", lambda *a, **k: (1.0, 100.0))
    run = tmp_path / "patience"
    train.main(train.parse_args(["--cache", str(synthetic_cache), "--run-dir", str(run), "--arch", "resnet18",
                                 "--no-pretrained", "--epochs", "5", "--patience", "2"]))
    assert len(pd.read_csv(run / "history.csv")) == 3  # best at epoch 1, two worse, stop


def test_fp32_and_bf16_both_train(synthetic_cache, tmp_path):
    for precision in ("fp32", "bf16"):
        run = tmp_path / precision
        train.main(train.parse_args(["--cache", str(synthetic_cache), "--run-dir", str(run), "--arch", "resnet18",
                                     "--no-pretrained", "--epochs", "1", "--precision", precision, "--aug", "none"]))
        expected = {"fp32": "fp32", "bf16": "bfloat16"}[precision]
        assert json.loads((run / "config.json").read_text())["precision"] == expected
        assert np.isfinite(pd.read_csv(run / "history.csv")["train_loss"]).all()


def test_torchrun_trains_with_two_cpu_processes(synthetic_cache, tmp_path):
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               "--cache", str(synthetic_cache), "--run-dir", str(run), "--arch", "resnet18", "--no-pretrained",
               "--epochs", "2", "--batch-size", "32", "--threads", "1", "--device", "cpu"]
    # its own session, so that a hang kills the workers too, not only torchrun
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    out = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("training resnet18") == 1  # only rank 0 reports and writes
    config = json.loads((run / "config.json").read_text())
    assert config["processes"] == 2
    assert len(pd.read_csv(run / "history.csv")) == 2
    model, checkpoint = common.load_checkpoint(run / "model.pt")
    assert not any(k.startswith("module.") for k in checkpoint["model"])  # loads without DDP


def test_metadata_features_encode_what_is_known_and_leave_the_rest_zero():
    rows = pd.DataFrame({"age": [45.0, None, 200], "sex": ["male", "unknown", "FEMALE"],
                         "localization": ["back", "unknown", None], "dx_type": ["histo", "histo", "histo"]})
    features = common.metadata_features(rows)
    assert features.shape == (3, common.METADATA_SIZE)
    site = 2 + len(common.SEXES)
    assert features[0, 0] == pytest.approx(-0.25) and features[0, 1] == 1
    assert features[0, 2 + common.SEXES.index("male")] == 1 and features[0, site + common.SITES.index("back")] == 1
    assert features[0].sum() == pytest.approx(-0.25 + 3)
    assert not features[1].any()  # all unknown: what an image without metadata gets
    assert features[2, :2].tolist() == [0, 0] and features[2, 2 + common.SEXES.index("female")] == 1
    # a table without the columns at all (PH2) is all zeros too, and dx_type is never read
    assert not common.metadata_features(pd.DataFrame({"dx_type": ["histo"]})).any()
    hidden = common.hide_metadata(torch.ones(2000, common.METADATA_SIZE), 0.25)
    for _, first, size in common.METADATA_FIELDS:
        field = hidden[:, first:first + size]
        assert ((field == 0).all(dim=1) | (field == 1).all(dim=1)).all()  # a field is hidden whole
        assert 0.2 < (field == 0).all(dim=1).float().mean() < 0.3


def test_a_metadata_model_learns_from_metadata_and_scores_images_without_it(synthetic_data, synthetic_cache,
                                                                             tmp_path):
    """Age is made to carry the label (malignant images 80, benign 30); the images are the same
    synthetic ones. A model that fuses metadata ranks validation images far better with their
    metadata than without it, and evaluate.py and predict.py feed it the metadata too."""
    import shutil

    import predict
    cache = tmp_path / "cache"
    shutil.copytree(synthetic_cache, cache)
    index = pd.read_csv(cache / "index.csv")
    index["age"] = np.where(index["malignant"] == 1, 80.0, 30.0)
    index["sex"] = "female"
    index.to_csv(cache / "index.csv", index=False)
    run = tmp_path / "meta"
    train.main(train.parse_args(["--cache", str(cache), "--run-dir", str(run), "--arch", "resnet18",
                                 "--no-pretrained", "--epochs", "6", "--lr", "3e-3", "--aug", "none", "--metadata",
                                 "--seed", "0"]))
    model, checkpoint = common.load_checkpoint(run / "model.pt")
    assert checkpoint["metadata"] is True
    val = index[index["split"] == "val"]
    images = common.model_inputs(common.load_cache(cache)[1], val["row"], "full")
    auc = {}
    for name, metadata in {"with": common.metadata_features(val), "without": None}.items():
        probs, _ = common.predict_probs(model, images, checkpoint["normalisation"], torch.device("cpu"),
                                        metadata=metadata)
        auc[name] = common.ranking_metrics(val["malignant"], probs)["roc_auc"]
    assert auc["with"] > 0.85 and auc["with"] > auc["without"] + 0.15, auc
    threshold.main(threshold.parse_args(["--run", str(run)]))
    evaluate.main(evaluate.parse_args(["--run", str(run), "--bootstrap", "0"]))
    assert pd.read_csv(run / "metrics.csv")["roc_auc"].iloc[0] > 0.85
    # predict.py: the same image is riskier at 80 than at 30, and without an age it still gets a score
    image = synthetic_data / pd.read_csv(synthetic_data / "metadata.csv")["filename"].iloc[0]
    probs = {}
    for name, flags in {"old": ["--age", "80"], "young": ["--age", "30"], "none": []}.items():
        out = tmp_path / f"{name}.csv"
        predict.main(predict.parse_args(["--run", str(run), str(image), "--out", str(out), "--sex", "female",
                                         *flags]))
        probs[name] = pd.read_csv(out)["malignancy_prob"].iloc[0]
    assert probs["old"] > probs["young"] + 0.05
    assert 0 <= probs["none"] <= 1
