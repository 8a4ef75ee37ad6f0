"""The third edition's pieces (docs/third_edition.md): acquisition-shift augmentation, the ISIC
Archive's general site words, choosing the epoch on one source's val rows, and the outside panel."""
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, trained_with_thresholds

import common
import evaluate
import train

sys.path.insert(0, str(ROOT / "bench"))
import panel  # noqa: E402


def test_acquisition_shift_frames_blurs_and_casts_within_the_pixel_range():
    torch.manual_seed(0)
    grey = torch.full((64, 48, 48, 3), 128, dtype=torch.uint8)
    untouched = train.acquisition_shift(grey, p=0.0)
    assert untouched.dtype == torch.float32 and torch.equal(untouched, grey.float())
    shifted = train.acquisition_shift(grey, p=1.0)
    assert shifted.shape == grey.shape and shifted.min() >= 0 and shifted.max() <= 255
    # every image framed: the corners darker than the centre, by a frame of random radius
    corners = shifted[:, [0, 0, -1, -1], [0, -1, 0, -1]].mean(dim=(1, 2))
    centre = shifted[:, 24, 24].mean(dim=1)
    assert (corners < centre).float().mean() > 0.9
    # gamma and the channel gains give the images different colours
    assert centre.std() > 5 and shifted[:, 24, 24].std(dim=1).mean() > 1
    # zoom out, crops, JPEG: uint8 CHW of the training size
    augment = train.make_augment("shift", 40)
    images = torch.randint(0, 256, (8, 3, 56, 56), dtype=torch.uint8)
    assert all(augment(image).shape == (3, 40, 40) and augment(image).dtype == torch.uint8 for image in images)


def test_general_site_words_spread_over_the_sites_they_cover_and_unknown_words_are_counted():
    rows = pd.DataFrame({"localization": ["torso", "posterior torso", "head/neck", "back", "moon", "", "unknown"]})
    site = common.METADATA_FIELDS[2][1]
    features = common.metadata_features(rows, general_sites=True)[:, site:]
    column = {name: k for k, name in enumerate(common.SITES)}
    counts = common.HAM10000_SITE_COUNTS
    torso = counts["back"] + counts["trunk"] + counts["abdomen"] + counts["chest"]
    assert features[0].sum() == pytest.approx(1)
    assert features[0, column["back"]] == pytest.approx(counts["back"] / torso)
    assert features[0, column["chest"]] == pytest.approx(counts["chest"] / torso)
    assert features[1, column["back"]] == 1 and features[1].sum() == 1  # posterior torso is the back
    assert features[2, [column[s] for s in ("face", "neck", "scalp", "ear")]].sum() == pytest.approx(1)
    assert features[3, column["back"]] == 1 and features[3].sum() == 1
    assert not features[4:].any()  # a word no vocabulary has, and no word at all: site unknown
    unmapped = common.metadata_features(rows)[:, site:]  # lever L6 was not kept: by default, unknown
    assert not unmapped[[0, 1, 2]].any() and unmapped[3, column["back"]] == 1
    assert common.unknown_sites(rows, general_sites=True) == {"moon": 1}
    assert common.unknown_sites(rows) == {"torso": 1, "posterior torso": 1, "head/neck": 1, "moon": 1}
    assert common.unknown_sites_line(rows.iloc[[0, 0, 4]]) == ("3 of 3 images name a site the model does not know, "
                                                                "read as site unknown: 'torso' (2), 'moon' (1)")
    assert common.unknown_sites_line(rows.iloc[3:4]) is None


def test_val_source_chooses_the_epoch_on_that_source_alone(synthetic_cache, tmp_path):
    index = pd.read_csv(synthetic_cache / "index.csv")
    # a cache of two sources: every second val row another clinic's
    two = tmp_path / "two_sources"
    two.mkdir()
    for name in ("images.npy", "crops.npy", "masks.npy", "cache_key.json"):
        (two / name).symlink_to(synthetic_cache / name)
    val = np.flatnonzero(index["split"] == "val")
    index["source"] = "ham"
    index.loc[val[::2], "source"] = "other"
    index.to_csv(two / "index.csv", index=False)
    run = trained_with_thresholds(two, tmp_path / "run", "--epochs", "1", "--img-size", "32", "--val-source", "ham")
    val_probs = pd.read_csv(run / "val_probs.csv")
    assert set(val_probs["image_id"]) == set(index.loc[val[1::2], "image_id"])
    # evaluate.py's val (make threshold's test-time-augmented reading) is the same rows, unless told
    evaluate.main(evaluate.parse_args(["--run", str(run), "--split", "val", "--bootstrap", "0",
                                       "--out-dir", str(tmp_path / "val")]))
    assert set(pd.read_csv(tmp_path / "val" / "test_probs.csv")["image_id"]) == set(val_probs["image_id"])
    evaluate.main(evaluate.parse_args(["--run", str(run), "--split", "val", "--source", "other", "--bootstrap", "0",
                                       "--out-dir", str(tmp_path / "other")]))
    assert set(pd.read_csv(tmp_path / "other" / "test_probs.csv")["image_id"]) == set(index.loc[val[::2], "image_id"])
    with pytest.raises(SystemExit, match="has no source mars"):
        train.main(train.parse_args(["--cache", str(two), "--run-dir", str(tmp_path / "bad"), "--val-source", "mars"]))


def test_panel_pairs_seeds_leaves_out_training_images_and_applies_the_rule(synthetic_cache, trained_run, tmp_path):
    second = trained_with_thresholds(synthetic_cache, tmp_path / "second", "--epochs", "1", "--img-size", "32",
                                     "--seed", "1", "--metadata")
    # a metadata model's readings share one pass of its image network: the same as reading by reading
    index, arrays = common.load_cache(synthetic_cache)
    models = common.load_folder_models(second, torch.device("cpu"))
    known = index.assign(age=np.where(index["malignant"] == 1, 80.0, 30.0), sex="female", localization="torso")
    readings = {"shown": common.metadata_features(known), "hidden": common.metadata_features(
        common.hidden_metadata(known))}
    assert not np.array_equal(*readings.values())
    shared = panel.readings_probs(models, arrays, index["row"], torch.device("cpu"), readings)
    for reading, metadata in readings.items():
        alone, _ = common.ensemble_probs(models, arrays, index["row"], torch.device("cpu"), metadata=metadata)
        assert np.allclose(shared[reading], alone, atol=1e-5)
    out = tmp_path / "panel"
    # every site read from the synthetic cache; the baseline's seeds are the tiny run and the second
    panel.main(panel.parse_args(["--arm", f"B={trained_run},{second}", "--arm", f"same={trained_run},{second}",
                                 "--arm", f"swapped={second},{trained_run}",
                                 "--arm", f"both={trained_run}+{second},{trained_run}+{second}",
                                 "--cache-pattern", str(synthetic_cache),
                                 "--bootstrap", "50", "--keep", str(tmp_path / "kept"), "--out", str(out)]))
    table = pd.read_csv(out.with_suffix(".csv"))
    index = pd.read_csv(synthetic_cache / "index.csv")
    not_trained = index[index["split"] != "train"]
    ph2 = table[(table["site"] == "ph2") & (table["arm"] == "B")].iloc[0]
    assert ph2["images"] == len(not_trained)  # a site's training images are never scored
    kept_folder = tmp_path / "kept" / str(trained_run).strip("/").replace("/", "__")
    kept = pd.read_csv(kept_folder / "ph2_none.csv").set_index("image_id").loc[not_trained["image_id"]]
    own = common.ranking_metrics(not_trained["malignant"], kept["prob"])["roc_auc"]
    assert ph2["roc_auc_seed0"] == pytest.approx(own)
    same = table[table["arm"] == "same"]
    assert (same["difference"] == 0).all() and (same["difference_lo"] == 0).all()
    swapped = table[(table["arm"] == "swapped") & (table["site"] == "ph2")].iloc[0]
    # seed by seed: the swapped arm's differences are each seed's gap, opposite in sign
    assert swapped["difference_seed0"] == pytest.approx(ph2["roc_auc_seed1"] - ph2["roc_auc_seed0"])
    assert swapped["difference_seed1"] == pytest.approx(-swapped["difference_seed0"])
    assert swapped["difference"] == pytest.approx(0)
    # an ensemble in a seed's place: the mean of its members' kept probabilities, image by image
    second_kept = pd.read_csv(tmp_path / "kept" / str(second).strip("/").replace("/", "__") / "ph2_none.csv")
    mean = (kept["prob"] + second_kept.set_index("image_id").loc[not_trained["image_id"], "prob"]) / 2
    both = table[(table["arm"] == "both") & (table["site"] == "ph2")].iloc[0]
    assert both["roc_auc_seed0"] == pytest.approx(common.ranking_metrics(not_trained["malignant"], mean)["roc_auc"])
    verdict = pd.read_csv(tmp_path / "panel_verdicts.csv").set_index("arm")
    assert not verdict.loc["same", "passes"]  # no gain is no change worth keeping
    assert "| same |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="same number of runs"):
        panel.main(panel.parse_args(["--arm", f"B={trained_run}", "--arm", f"X={trained_run},{second}",
                                     "--out", str(out)]))



def test_both_views_train_through_one_network_and_predict_as_they_were_trained(synthetic_cache, tmp_path):
    import evaluate
    index, arrays = common.load_cache(synthetic_cache)
    both = common.model_inputs(arrays, index["row"][:4], "both", 32)
    assert both.shape == (4, 32, 32, 6)
    assert np.array_equal(both[..., :3], common.model_inputs(arrays, index["row"][:4], "crop", 32))
    assert np.array_equal(both[..., 3:], common.model_inputs(arrays, index["row"][:4], "full", 32))
    # each view augmented on its own, both normalised alike
    torch.manual_seed(0)
    x = train.augment_batch(torch.from_numpy(both), train.make_augment("shift", 32),
                            {"mean": [0.5] * 3, "std": [0.5] * 3}, noise=0, hue=0.02, shift=True)
    assert x.shape == (4, 6, 32, 32) and x.min() >= -1.001 and x.max() <= 1.001
    run = trained_with_thresholds(synthetic_cache, tmp_path / "both", "--epochs", "1", "--img-size", "32",
                                  "--input", "both", "--metadata")
    model, checkpoint = common.load_checkpoint(run / "model.pt")
    assert checkpoint["input"] == "both" and type(model).__name__ == "TwoViews"
    # the network reads the two views apart: swapping them changes the probabilities
    rows = index[index["split"] == "val"]["row"]
    probs, _ = common.ensemble_probs([(model, checkpoint)], arrays, rows, torch.device("cpu"))
    assert np.allclose(probs, pd.read_csv(run / "val_probs.csv")["prob"], atol=1e-5)
    swapped = common.model_inputs(arrays, rows, "both", 32)[..., [3, 4, 5, 0, 1, 2]]
    swapped_probs, _ = common.predict_probs(model, swapped, checkpoint["normalisation"], torch.device("cpu"))
    assert not np.allclose(probs, swapped_probs, atol=1e-4)
    # the panel reads such a model with each reading's metadata (it once read every reading as hidden)
    known = index.assign(age=np.where(index["malignant"] == 1, 85.0, 20.0), sex="female", localization="back")
    readings = {"shown": common.metadata_features(known), "hidden": common.metadata_features(
        common.hidden_metadata(known))}
    shared = panel.readings_probs([(model, checkpoint)], arrays, index["row"], torch.device("cpu"), readings)
    alone = {reading: common.ensemble_probs([(model, checkpoint)], arrays, index["row"], torch.device("cpu"),
                                            metadata=values)[0] for reading, values in readings.items()}
    assert np.abs(alone["shown"] - alone["hidden"]).max() > 1e-6  # the metadata moves this model
    for reading in readings:
        assert np.allclose(shared[reading], alone[reading], atol=1e-6)
    evaluate.main(evaluate.parse_args(["--run", str(run), "--split", "val", "--bootstrap", "0", "--no-tta"]))
    assert (run / "metrics.csv").is_file()
    with pytest.raises(SystemExit, match="reads two"):
        evaluate.main(evaluate.parse_args(["--run", str(run), "--split", "val", "--gradcam", "2"]))
