import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_DATA

import fetch_data


def split_args(seed=0, val=0.15, test=0.15):
    return fetch_data.parse_args(["--synthetic", "20", "--out", "unused", "--seed", str(seed),
                                  "--val-frac", str(val), "--test-frac", str(test)])


def random_metadata(n_images=3000, seed=0):
    rng = np.random.default_rng(seed)
    lesion = rng.integers(0, 2200, n_images)  # many lesions photographed more than once
    dx_of_lesion = rng.choice(list(fetch_data.HAM10000_DX_COUNTS), 2200,
                              p=np.array(list(fetch_data.HAM10000_DX_COUNTS.values())) / 10015)
    return pd.DataFrame({"image_id": [f"I{i}" for i in range(n_images)],
                         "filename": [f"images/I{i}.jpg" for i in range(n_images)],
                         "lesion_id": [f"L{k}" for k in lesion], "dx": dx_of_lesion[lesion]})


def test_synthetic_split_keeps_each_lesion_in_one_split(synthetic_data):
    meta = pd.read_csv(synthetic_data / "metadata.csv")
    assert (meta.groupby("lesion_id").size() > 1).any(), "the test needs lesions with several images"
    assert (meta.groupby("lesion_id")["split"].nunique() == 1).all()
    assert set(meta["split"]) == {"train", "val", "test"}
    assert (meta["malignant"] == meta["dx"].isin(["mel", "bcc", "akiec"]).astype(int)).all()
    for row in meta.itertuples():
        assert (synthetic_data / row.filename).is_file()


def test_split_is_grouped_stratified_and_deterministic():
    meta = fetch_data.finish_metadata(random_metadata(), split_args(seed=3))
    again = fetch_data.finish_metadata(random_metadata(), split_args(seed=3))
    other = fetch_data.finish_metadata(random_metadata(), split_args(seed=4))
    assert (meta.groupby("lesion_id")["split"].nunique() == 1).all()
    assert meta["split"].tolist() == again["split"].tolist()
    assert meta["split"].tolist() != other["split"].tolist()
    lesion_share = meta.drop_duplicates("lesion_id")["split"].value_counts(normalize=True)
    assert lesion_share["train"] == pytest.approx(0.70, abs=0.03)
    assert lesion_share["val"] == pytest.approx(0.15, abs=0.03)
    assert lesion_share["test"] == pytest.approx(0.15, abs=0.03)
    # stratified: the malignant share is about the same in every split
    share = meta.groupby("split")["malignant"].mean()
    assert share.max() - share.min() < 0.04


def test_split_fractions_follow_the_flags():
    meta = fetch_data.finish_metadata(random_metadata(), split_args(val=0.1, test=0.2))
    lesion_share = meta.drop_duplicates("lesion_id")["split"].value_counts(normalize=True)
    assert lesion_share["val"] == pytest.approx(0.10, abs=0.03)
    assert lesion_share["test"] == pytest.approx(0.20, abs=0.03)


def test_images_without_lesion_id_are_lesions_of_their_own():
    meta = random_metadata(200)
    meta.loc[:49, "lesion_id"] = np.nan
    out = fetch_data.finish_metadata(meta, split_args())
    assert out.loc[:49, "lesion_id"].tolist() == out.loc[:49, "image_id"].tolist()


def test_import_ham10000_subset_reports_missing_and_corrupt_images(tmp_path, capsys):
    labels = pd.read_csv(SHARED_DATA / "ham10000_224" / "labels.csv").head(60)
    root = tmp_path / "copy"
    (root / "images").mkdir(parents=True)
    for f in labels["filename"]:
        shutil.copy(SHARED_DATA / "ham10000_224" / f, root / f)
    (root / labels["filename"][0]).write_bytes(b"not a jpeg")
    (root / labels["filename"][1]).unlink()
    labels.to_csv(root / "labels.csv", index=False)

    out = tmp_path / "ham"
    fetch_data.main(fetch_data.parse_args(["--from-dir", str(root), "--out", str(out)]))
    printed = capsys.readouterr().out
    assert labels["image_id"][0] in printed and "not a readable image" in printed
    assert labels["image_id"][1] in printed and "file not found" in printed
    assert "skipped 2 of 60" in printed
    meta = pd.read_csv(out / "metadata.csv")
    assert len(meta) == 58
    expected = labels.set_index("image_id").loc[meta["image_id"]]
    assert (meta["dx"].to_numpy() == expected["label"].to_numpy()).all()
    assert (meta["malignant"].to_numpy() == (expected["binary"] == "malignant").to_numpy()).all()
    assert (meta["lesion_id"].to_numpy() == expected["lesion_id"].to_numpy()).all()
    assert "dx_type" in meta.columns  # kept for analysis, never a model input
    assert all((out / f).is_file() for f in meta["filename"])


def test_import_ph2_maps_nevi_and_melanoma(tmp_path):
    out = tmp_path / "ph2"
    fetch_data.main(fetch_data.parse_args(["--from-dir", str(SHARED_DATA / "ph2"), "--out", str(out)]))
    meta = pd.read_csv(out / "metadata.csv")
    assert len(meta) == 100
    assert meta["malignant"].sum() == 20
    assert set(meta["dx"]) == {"nv", "mel"}


def test_unknown_diagnosis_is_a_one_line_error(tmp_path):
    (tmp_path / "labels.csv").write_text("image_id,label\nA,wart\n")
    with pytest.raises(SystemExit) as exc:
        fetch_data.main(fetch_data.parse_args(["--from-dir", str(tmp_path), "--out", str(tmp_path / "o")]))
    message = str(exc.value)
    assert "labels.csv" in message and "line 2" in message and "wart" in message and "\n" not in message
    assert not (tmp_path / "o" / "metadata.csv").exists()
    (tmp_path / "labels.csv").write_text("image_id,label\nA,nv\nB,\n")
    with pytest.raises(SystemExit) as exc:
        fetch_data.main(fetch_data.parse_args(["--from-dir", str(tmp_path), "--out", str(tmp_path / "o")]))
    assert "labels.csv: line 3: label is empty" in str(exc.value)


def test_only_split_imports_the_given_splits_and_reads_no_other(tmp_path):
    labels = pd.read_csv(SHARED_DATA / "isic2017" / "labels.csv")
    chosen = pd.concat([labels[labels["split"] == split].head(3) for split in ("train", "val", "test")])
    chosen.to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "isic2017_trainval"
    fetch_data.main(fetch_data.parse_args(["--from-dir", str(SHARED_DATA / "isic2017"), "--labels",
                                           str(tmp_path / "labels.csv"), "--only-split", "train", "val",
                                           "--assign-split", "val", "--out", str(out)]))
    meta = pd.read_csv(out / "metadata.csv")
    assert sorted(meta["image_id"]) == sorted(chosen.loc[chosen["split"] != "test", "image_id"])
    assert set(meta["split"]) == {"val"}
    assert len(list((out / "images").iterdir())) == 6  # the test images were not copied
    with pytest.raises(SystemExit) as exc:
        fetch_data.main(fetch_data.parse_args(["--synthetic", "30", "--only-split", "val", "--out",
                                               str(tmp_path / "y")]))
    assert "--only-split" in str(exc.value)


HAM_FULL = SHARED_DATA / "ham10000_full"


def import_from(*args):
    fetch_data.main(fetch_data.parse_args([str(a) for a in args]))


def test_given_test_split_is_kept_and_the_rest_split_into_train_and_val_with_masks(tmp_path):
    """A slice of ham10000_full: its given test lesions stay test, the others go to train and val
    only; every expert mask (600x450) arrives at its image's size."""
    import cv2
    import preprocess
    out = tmp_path / "hamfull"
    import_from("--from-dir", HAM_FULL, "--limit", "150", "--out", out)
    meta = pd.read_csv(out / "metadata.csv")
    labels = pd.read_csv(HAM_FULL / "labels.csv").head(150).set_index("image_id").loc[meta["image_id"]]
    given_test = labels["split"].eq("test").to_numpy()
    assert given_test.sum() > 10 and (meta["split"].to_numpy()[given_test] == "test").all()
    assert set(meta["split"][~given_test]) == {"train", "val"}
    assert (meta.groupby("lesion_id")["split"].nunique() == 1).all()
    assert set(meta["source"]) == {"ham10000_full"} and (meta["lesion_id"] == labels["lesion_id"].to_numpy()).all()
    for row in meta.head(20).itertuples():
        mask = cv2.imread(str(out / row.mask), cv2.IMREAD_GRAYSCALE)
        assert mask.shape == cv2.imread(str(out / row.filename)).shape[:2] == (150, 200)
        expert = cv2.imread(str(HAM_FULL / labels.loc[row.image_id, "mask"]), cv2.IMREAD_GRAYSCALE)
        expert = cv2.resize(expert, (200, 150), interpolation=cv2.INTER_AREA) >= 128
        assert preprocess.dice_jaccard(mask > 0, expert)[0] > 0.99


def write_labels(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    return folder / "labels.csv"


def test_a_split_that_is_none_or_a_lesion_in_two_splits_names_the_file_and_row(tmp_path):
    labels = write_labels(tmp_path / "a", {"image_id": ["A", "B", "C"], "label": "nv", "lesion_id": ["L1", "L1", "L2"],
                                           "split": ["train", "", "holdout"]})
    with pytest.raises(SystemExit) as exc:
        import_from("--from-dir", tmp_path / "a", "--out", tmp_path / "o")
    assert str(exc.value) == (f"error: {labels}: line 4: split 'holdout' is not train, val or test (or empty: "
                              "split lesion-level)")
    write_labels(tmp_path / "a", {"image_id": ["A", "B", "C"], "label": "nv", "lesion_id": ["L1", "L1", "L2"],
                                  "split": ["train", "test", ""]})
    with pytest.raises(SystemExit) as exc:
        import_from("--from-dir", tmp_path / "a", "--out", tmp_path / "o")
    assert str(labels) in str(exc.value)
    assert "lesion L1 has images in more than one split (test, train)" in str(exc.value)
    assert not (tmp_path / "o" / "metadata.csv").exists()


def test_an_image_of_a_lesion_without_a_split_follows_its_lesion():
    df = pd.DataFrame({"image_id": ["A", "B", "C"], "dx": "nv", "lesion_id": ["L1", "L1", None],
                       "split": ["test", None, ""]})
    out = fetch_data.given_splits(df, "labels.csv")
    assert out["split"].tolist()[:2] == ["test", "test"] and pd.isna(out["split"].iloc[2])
    assert out["lesion_id"].tolist() == ["L1", "L1", "C"]


def test_two_sources_make_one_dataset_with_their_ids_kept_apart(tmp_path):
    out = tmp_path / "ham+isic2017"
    import_from("--from-dir", HAM_FULL, SHARED_DATA / "isic2017", "--limit", "40", "--out", out)
    meta = pd.read_csv(out / "metadata.csv")
    assert meta["source"].value_counts().to_dict() == {"ham10000_full": 40, "isic2017": 40}
    isic = meta[meta["source"] == "isic2017"].set_index("image_id")
    given = pd.read_csv(SHARED_DATA / "isic2017" / "labels.csv").set_index("image_id").loc[isic.index]
    assert (isic["split"] == given["split"]).all()  # ISIC 2017's official splits, as given
    assert meta["lesion_id"].str.startswith(tuple(f"{s}:" for s in meta["source"].unique())).all()
    assert meta["mask"].notna().sum() == 40  # only HAM10000 brings masks
    # the dataset imported again (a copy moved elsewhere, say) keeps its sources, lesions and splits
    import_from("--from-dir", out, "--out", tmp_path / "again")
    again = pd.read_csv(tmp_path / "again" / "metadata.csv")
    for column in ("image_id", "source", "lesion_id", "split", "dx", "mask"):
        assert again[column].equals(meta[column]), column
    # two copies of one image (the same HAM10000 image in two folders) end the import
    write_labels(tmp_path / "one", {"image_id": ["ISIC_1", "ISIC_2"], "label": "nv"})
    second = write_labels(tmp_path / "two", {"image_id": ["ISIC_3", "ISIC_1"], "label": "mel"})
    with pytest.raises(SystemExit) as exc:
        import_from("--from-dir", tmp_path / "one", tmp_path / "two", "--out", tmp_path / "o")
    assert str(exc.value) == (f"error: {second}: image_id ISIC_1 is in source one too: the same image twice? "
                              "Import one copy")


def test_only_split_chooses_assigned_splits_too(tmp_path):
    """ham10000_full's train and val without reading a test image: the split is drawn from the
    labels alone, so it is the same with --only-split as without."""
    import_from("--from-dir", HAM_FULL, "--limit", "150", "--out", tmp_path / "all")
    import_from("--from-dir", HAM_FULL, "--limit", "150", "--only-split", "train", "val",
                "--out", tmp_path / "trainval")
    whole = pd.read_csv(tmp_path / "all" / "metadata.csv")
    part = pd.read_csv(tmp_path / "trainval" / "metadata.csv")
    assert part.equals(whole[whole["split"] != "test"].reset_index(drop=True))
    assert len(list((tmp_path / "trainval" / "images").iterdir())) == len(part)
