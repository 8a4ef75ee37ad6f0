"""train_segmenter.py, and the learned segmenter in preprocess.py and predict.py, on the synthetic
data's ground-truth masks in a few quick epochs."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import common
import predict
import preprocess
import train_segmenter


@pytest.fixture(scope="module")
def segmenter_run(synthetic_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("segmenter") / "run"
    train_segmenter.main(train_segmenter.parse_args(["--data", str(synthetic_data), "--run-dir", str(run),
                                                     "--epochs", "2", "--batch-size", "16"]))
    return run


@pytest.fixture(scope="module")
def unet_cache(synthetic_data, segmenter_run, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache_unet") / "synthetic_64_unet"
    preprocess.main(preprocess.parse_args(["--data", str(synthetic_data), "--img-size", "64", "--out", str(cache),
                                           "--segmenter", "unet", "--segmenter-model",
                                           str(segmenter_run / "model.pt"), "--workers", "2"]))
    return cache


def test_the_segmenter_learns_and_keeps_its_best_validation_epoch(segmenter_run):
    history = pd.read_csv(segmenter_run / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    model, checkpoint = common.load_segmenter(segmenter_run / "model.pt")  # weights_only=True inside
    assert checkpoint["epoch"] == history["epoch"][history["val_dice"].idxmax()]
    assert checkpoint["val_dice"] == pytest.approx(history["val_dice"].max())
    # synthetic lesions are easy: two epochs from ImageNet weights already find them
    assert checkpoint["val_dice"] > 0.8
    x = torch.zeros(1, 3, *reversed(checkpoint["input_size"]))
    assert model(x).shape == (1, 1, *reversed(checkpoint["input_size"]))


def test_resume_continues_where_training_stopped(segmenter_run, synthetic_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(segmenter_run, run)
    train_segmenter.main(train_segmenter.parse_args(["--data", str(synthetic_data), "--run-dir", str(run),
                                                     "--epochs", "3", "--batch-size", "16", "--resume"]))
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    before = pd.read_csv(segmenter_run / "history.csv")
    pd.testing.assert_frame_equal(history.head(2), before)


def test_a_dataset_without_masks_is_a_one_line_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame({"image_id": ["A"], "filename": ["images/A.jpg"], "lesion_id": ["L"], "dx": ["nv"],
                  "malignant": [0], "split": ["train"]}).to_csv(data / "metadata.csv", index=False)
    with pytest.raises(SystemExit) as exc:
        train_segmenter.main(train_segmenter.parse_args(["--data", str(data), "--run-dir", str(tmp_path / "run")]))
    assert "metadata.csv: has no ground-truth masks" in str(exc.value)


def test_preprocess_segments_with_the_unet_and_names_it_in_the_cache_key(unet_cache, segmenter_run):
    key = json.loads((unet_cache / "cache_key.json").read_text())
    assert key["segmenter"] == "unet"
    assert key["segmenter_sha256"] == common.file_digest(segmenter_run / "model.pt")
    index = pd.read_csv(unet_cache / "index.csv")
    assert set(index["mask_source"]) <= {"unet", "classical"} and (index["mask_source"] == "unet").mean() > 0.9
    summary = json.loads((unet_cache / "segmentation_summary.json").read_text())
    assert summary["images"] == len(index) and summary["mean_dice"] > 0.8


def test_predict_segments_as_its_models_cache_was_built(evaluated_run, unet_cache, segmenter_run, synthetic_data,
                                                        tmp_path):
    """The classifier's weights, told their cache was built with the U-Net: predict.py's masks are then
    the U-Net's, as in that cache; and a segmenter file that changed since ends with one line."""
    run = tmp_path / "run_unet"
    run.mkdir()
    (run / "thresholds.json").write_bytes((evaluated_run / "thresholds.json").read_bytes())
    checkpoint = torch.load(evaluated_run / "model.pt", weights_only=True)
    checkpoint["preprocess"] = json.loads((unet_cache / "cache_key.json").read_text())
    torch.save(checkpoint, run / "model.pt")
    index = pd.read_csv(unet_cache / "index.csv").set_index("image_id").head(4)
    files = [str(synthetic_data / name) for name in index["filename"]]
    predict.main(predict.parse_args(["--run", str(run), *files, "--out", str(tmp_path / "pred.csv")]))
    pred = pd.read_csv(tmp_path / "pred.csv")
    np.testing.assert_allclose(pred["mask_area"], index["mask_area"], atol=1e-9)

    changed = tmp_path / "changed.pt"
    shutil.copy(segmenter_run / "model.pt", changed)
    with open(changed, "ab") as f:
        f.write(b"\0")
    checkpoint["preprocess"]["segmenter_model"] = str(changed)
    torch.save(checkpoint, run / "model.pt")
    with pytest.raises(SystemExit) as exc:
        predict.main(predict.parse_args(["--run", str(run), *files, "--out", str(tmp_path / "again.csv")]))
    assert str(changed) in str(exc.value) and "is not the segmenter" in str(exc.value)
