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
    # the best epoch's mask threshold is the cut of the best validation Dice; at 0.5 it scores as in history.csv
    cuts = pd.read_csv(segmenter_run / "thresholds.csv").set_index("mask_threshold")
    assert checkpoint["mask_threshold"] == cuts["val_dice"].idxmax()
    assert checkpoint["val_dice"] == pytest.approx(cuts["val_dice"].max())
    assert cuts.loc[0.5, "val_dice"] == pytest.approx(history["val_dice"].max(), abs=1e-6)
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


@pytest.fixture(scope="module")
def unet_run(unet_cache, tmp_path_factory):
    """A classifier trained on the U-Net cache, with test-time-augmented thresholds."""
    import evaluate
    import threshold
    import train
    run = tmp_path_factory.mktemp("runs_unet") / "unet_run"
    train.main(train.parse_args(["--cache", str(unet_cache), "--run-dir", str(run), "--epochs", "2",
                                 "--input", "crop", "--metadata", "--seed", "0"]))
    threshold.main(threshold.parse_args(["--run", str(run)]))
    evaluate.main(evaluate.parse_args(["--run", str(run), "--split", "val", "--tta", "--bootstrap", "0",
                                       "--out-dir", str(run / "val_tta")]))
    threshold.main(threshold.parse_args(["--run", str(run), "--probs", str(run / "val_tta" / "test_probs.csv")]))
    return run


def test_a_run_carries_its_segmenter_and_works_when_moved(unet_run, unet_cache, segmenter_run, synthetic_data,
                                                          tmp_path):
    checkpoint = torch.load(unet_run / "model.pt", weights_only=True)
    assert checkpoint["preprocess"]["segmenter_model"] == "segmenter.pt"  # relative to the model folder
    assert common.file_digest(unet_run / "segmenter.pt") == checkpoint["preprocess"]["segmenter_sha256"] == \
        common.file_digest(segmenter_run / "model.pt")
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(unet_run, moved)
    index = pd.read_csv(unet_cache / "index.csv").head(4)
    files = [str(synthetic_data / name) for name in index["filename"]]
    predict.main(predict.parse_args(["--run", str(moved), *files, "--out", str(tmp_path / "pred.csv")]))
    pred = pd.read_csv(tmp_path / "pred.csv")
    np.testing.assert_allclose(pred["mask_area"], index["mask_area"], atol=1e-9)
    (moved / "segmenter.pt").unlink()
    with pytest.raises(SystemExit) as exc:
        predict.main(predict.parse_args(["--run", str(moved), *files, "--out", str(tmp_path / "again.csv")]))
    assert str(moved / "segmenter.pt") in str(exc.value) and "not found" in str(exc.value)


def test_export_writes_a_compact_folder_that_predicts_as_the_run(unet_run, unet_cache, synthetic_data, tmp_path):
    import evaluate
    import export_model
    out = tmp_path / "models" / "small"
    out.mkdir(parents=True)
    (out / "MODEL_CARD.md").write_text("kept\n")
    (out / "model.pt").write_bytes(b"an older export")
    export_model.main(export_model.parse_args(["--run", str(unet_run), "--out", str(out)]))
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "export.json", "model.onnx", "model.pt",
                                                     "onnx.json", "segmenter.onnx", "segmenter.pt", "thresholds.json"]
    assert (out / "MODEL_CARD.md").read_text() == "kept\n"
    assert not [p for p in out.parent.iterdir() if p.name.startswith((".small.export", ".small.old"))]  # none left
    assert (out / "thresholds.json").read_bytes() == (unet_run / "thresholds.json").read_bytes()
    # fp16: about half the run's files
    assert (out / "model.pt").stat().st_size < 0.6 * (unet_run / "model.pt").stat().st_size
    assert (out / "segmenter.pt").stat().st_size < 0.6 * (unet_run / "segmenter.pt").stat().st_size
    checkpoint = torch.load(out / "model.pt", weights_only=True)
    assert all(t.dtype == torch.float16 for t in checkpoint["model"].values() if t.is_floating_point())
    export = json.loads((out / "export.json").read_text())
    assert export["sha256"]["segmenter.pt"] == common.file_digest(out / "segmenter.pt") == \
        checkpoint["preprocess"]["segmenter_sha256"]
    # the ONNX files, checked against PyTorch before they were written, say so in export.json
    assert set(export["onnx"]["largest_probability_difference"]) == {"model.onnx", "segmenter.onnx"}
    assert all(0 <= d <= 1e-4 for d in export["onnx"]["largest_probability_difference"].values())

    # moved, the folder predicts as the full-precision run does, reading images as its thresholds were chosen
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    index = pd.read_csv(unet_cache / "index.csv")
    val = index[index["split"] == "val"].head(6)
    files = [str(synthetic_data / name) for name in val["filename"]]
    predict.main(predict.parse_args(["--run", str(moved), *files, "--out", str(tmp_path / "compact.csv")]))
    predict.main(predict.parse_args(["--run", str(unet_run), *files, "--out", str(tmp_path / "full.csv")]))
    compact, full = pd.read_csv(tmp_path / "compact.csv"), pd.read_csv(tmp_path / "full.csv")
    assert (compact["tta"] == 1).all()
    np.testing.assert_allclose(compact["malignancy_prob"], full["malignancy_prob"], atol=5e-3)
    tta_val = pd.read_csv(unet_run / "val_tta" / "test_probs.csv").set_index("image_id")
    np.testing.assert_allclose(full["malignancy_prob"], tta_val.loc[val["image_id"], "prob"], atol=1e-5)
    # evaluate.py takes the compact folder as a run, on a cache segmented by its own fp16 U-Net (not the
    # full-precision one's: a segmenter is known by its file's SHA-256), and agrees with predict.py there
    with pytest.raises(SystemExit, match="segmenter_sha256"):
        evaluate.main(evaluate.parse_args(["--run", str(moved), "--cache", str(unet_cache), "--split", "val",
                                           "--out-dir", str(tmp_path / "refused")]))
    compact_cache = tmp_path / "cache_compact"
    preprocess.main(preprocess.parse_args(["--data", str(synthetic_data), "--img-size", "64", "--out",
                                           str(compact_cache), "--segmenter", "unet", "--segmenter-model",
                                           str(moved / "segmenter.pt"), "--colour-constancy", "none"]))
    evaluate.main(evaluate.parse_args(["--run", str(moved), "--cache", str(compact_cache), "--split", "val",
                                       "--bootstrap", "0", "--out-dir", str(tmp_path / "eval")]))
    evaluated = pd.read_csv(tmp_path / "eval" / "test_probs.csv").set_index("image_id")
    assert (evaluated["tta"] == 1).all()
    np.testing.assert_allclose(compact["malignancy_prob"], evaluated.loc[val["image_id"], "prob"], atol=1e-5)


def test_an_epoch_draws_each_source_its_share_and_no_image_twice_before_all_once():
    sources = np.array(["a"] * 30 + ["b"] * 10)
    order = train_segmenter.epoch_order(sources, {"a": 1, "b": 1}, np.random.default_rng(0))
    assert len(order) == 40 and (sources[order] == "b").sum() == 20
    b_draws = order[sources[order] == "b"]
    assert sorted(b_draws) == sorted(list(range(30, 40)) * 2)  # each b image twice, as its share asks
    a_draws = order[sources[order] == "a"]
    assert len(set(a_draws)) == 20  # 20 of the 30 a images, none twice
    plain = train_segmenter.epoch_order(sources, {}, np.random.default_rng(0))
    assert sorted(plain) == list(range(40))


def test_two_sources_are_scored_each_on_their_own_val_images(synthetic_data, tmp_path):
    """Two mask sources: history.csv scores each one's val images, val_dice is their mean (each
    source once), the mask threshold is chosen on it; a weight for no source, or a source left
    without one, ends with one line."""
    data = tmp_path / "two"
    shutil.copytree(synthetic_data, data)
    metadata = pd.read_csv(data / "metadata.csv")
    metadata["source"] = np.where(np.arange(len(metadata)) % 3 == 0, "clinic_b", "clinic_a")
    metadata.to_csv(data / "metadata.csv", index=False)
    run = tmp_path / "run"
    args = ["--data", str(data), "--run-dir", str(run), "--epochs", "1", "--batch-size", "16", "--limit", "24"]
    train_segmenter.main(train_segmenter.parse_args([*args, "--source-weight", "clinic_a=1",
                                                     "--source-weight", "clinic_b=1"]))
    history = pd.read_csv(run / "history.csv")
    by_source = history[["val_dice_clinic_a", "val_dice_clinic_b"]].iloc[0]
    assert history["val_dice"][0] == pytest.approx(by_source.mean())
    config = json.loads((run / "config.json").read_text())
    assert set(config["sources"]) == {"clinic_a", "clinic_b"}
    assert all(0 < n <= 24 for counts in config["sources"].values() for n in counts)  # --limit: per source
    cuts = pd.read_csv(run / "thresholds.csv")
    assert {"val_dice_clinic_a", "val_dice_clinic_b"} <= set(cuts.columns)
    assert config["mask_threshold"] == cuts.loc[cuts["val_dice"].idxmax(), "mask_threshold"]
    for weights, words in ((["clinic_c=1"], "no train masks of source clinic_c"),
                           (["clinic_a=1"], "clinic_b too")):
        with pytest.raises(SystemExit) as exc:
            train_segmenter.main(train_segmenter.parse_args(
                [*args[:3], str(tmp_path / "other"), *args[4:], *[f"--source-weight={w}" for w in weights]]))
        assert words in str(exc.value)
    with pytest.raises(SystemExit):
        train_segmenter.parse_args([*args, "--source-weight", "clinic_a=0"])


def test_scores_hold_area_ratio_and_crop_coverage_and_the_bench_sets_segmenters_side_by_side(
        unet_cache, synthetic_cache, synthetic_data, tmp_path):
    import subprocess
    import sys
    truth = np.zeros((10, 20), bool)
    truth[2:8, 4:14] = True  # 60 pixels, 30 of them left of x = 9
    box = pd.Series({"crop_x0": 0, "crop_y0": 0, "crop_x1": 9, "crop_y1": 10})
    assert preprocess.crop_coverage(box, truth) == pytest.approx(0.5)
    beyond = pd.Series({"crop_x0": -5, "crop_y0": -5, "crop_x1": 9, "crop_y1": 15})  # a padded crop's box
    assert preprocess.crop_coverage(beyond, truth) == pytest.approx(0.5)
    scores = pd.read_csv(unet_cache / "segmentation_scores.csv")
    assert scores["area_ratio"].between(0.5, 2).mean() > 0.9 and scores["crop_coverage"].between(0, 1).all()
    summary = json.loads((unet_cache / "segmentation_summary.json").read_text())
    assert summary["share_crop_holds_98%"] == pytest.approx((scores["crop_coverage"] >= 0.98).mean())
    out = subprocess.run([sys.executable, str(common.Path(preprocess.__file__).parent / "bench" / "segmenter.py"),
                          "--data", str(synthetic_data), "--cache", f"classical={synthetic_cache}",
                          "--cache", f"unet={unet_cache}", "--name", "synthetic", "--out", str(tmp_path),
                          "--crops", "3"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    bench = pd.read_csv(tmp_path / "synthetic_summary.csv").set_index("segmenter")
    assert bench.loc["unet", "mean_dice"] == pytest.approx(summary["mean_dice"])
    assert bench.loc["unet", "median_area_ratio"] == pytest.approx(scores["area_ratio"].median())
    assert (tmp_path / "synthetic_worst.png").is_file() and (tmp_path / "synthetic_crops.png").is_file()


def test_evaluate_hides_age_sex_and_site_on_request(unet_run, unet_cache, tmp_path):
    """A metadata model scored with --hide-metadata scores as on a cache without those columns
    (as ISIC 2017's test images come), and otherwise differently."""
    import evaluate
    cache = tmp_path / "with_metadata"
    shutil.copytree(unet_cache, cache)
    index = pd.read_csv(cache / "index.csv")
    rng = np.random.default_rng(0)
    index["age"] = rng.integers(20, 90, len(index))
    index["sex"] = rng.choice(["male", "female"], len(index))
    index["localization"] = rng.choice(common.SITES, len(index))
    index.to_csv(cache / "index.csv", index=False)
    for name, source, extra in (("shown", cache, []), ("hidden", cache, ["--hide-metadata"]), ("none", unet_cache, [])):
        evaluate.main(evaluate.parse_args(["--run", str(unet_run), "--cache", str(source), "--split", "val",
                                           "--bootstrap", "0", "--no-tta", "--out-dir", str(tmp_path / name), *extra]))
    shown, hidden, none = (pd.read_csv(tmp_path / name / "test_probs.csv")["prob"] for name in ("shown", "hidden", "none"))
    np.testing.assert_allclose(hidden, none, atol=1e-6)
    assert np.abs(shown - none).max() > 1e-4
    assert "age, sex and site hidden" in (tmp_path / "hidden" / "report.md").read_text()
