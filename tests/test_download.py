"""fetch_data.py's downloads, against a local imitation of the ISIC Archive and Dataverse APIs."""
import hashlib
import io
import socket
import zipfile

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_DATA
from fake_remote import FakeRemote

import common
import fetch_data

HAM = SHARED_DATA / "ham10000_224"
HAM_FULL = SHARED_DATA / "ham10000_full"
ISIC2017 = SHARED_DATA / "isic2017"
# One Archive diagnosis (2024 taxonomy) per HAM10000 code, as the Archive spells them.
DIAGNOSIS_3 = {"nv": "Nevus", "mel": "Melanoma Invasive", "bkl": "Seborrheic keratosis",
               "bcc": "Basal cell carcinoma", "akiec": "Solar or actinic keratosis",
               "df": "Dermatofibroma", "vasc": "Hemangioma"}


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    """Backoff waits are recorded instead of slept."""
    waits = []
    monkeypatch.setattr(fetch_data, "sleep", waits.append)
    return waits


@pytest.fixture(scope="module")
def ham_sample():
    labels = pd.read_csv(HAM / "labels.csv")
    # two of each class, so every dx code is exercised
    return labels.groupby("label").head(2).reset_index(drop=True)


def isic_images(sample):
    images = [{"isic_id": r.image_id, "body": (HAM / r.filename).read_bytes(),
               "clinical": {"diagnosis_1": "Malignant" if r.binary == "malignant" else "Benign",
                            "diagnosis_3": DIAGNOSIS_3[r.label], "lesion_id": r.lesion_id,
                            "age_approx": r.age, "sex": r.sex, "anatom_site_general": r.localization,
                            "diagnosis_confirm_type": r.dx_type}}
              for r in sample.itertuples()]
    body = images[0]["body"]
    extra = [  # in the collection but not in the HAM10000 release, or with no HAM10000 code
        {"isic_id": "ISIC_0034400", "body": body, "clinical": {"diagnosis_3": "Nevus"}},  # 2018 validation
        {"isic_id": "ISIC_0034600", "body": body, "clinical": {"diagnosis_3": "Melanoma in situ"}},  # 2018 test
        {"isic_id": "ISIC_0035000", "body": body, "clinical": {"diagnosis_2": "Benign epidermal proliferations"}},
        {"isic_id": "ISIC_0030000", "body": body, "clinical": {"diagnosis_3": "Scar"}},
    ]
    return images + extra


def fetch(remote, out, *extra):
    args = fetch_data.parse_args(["--source", "isic", "--api-url", f"{remote.url}/api/v2/", "--out", str(out),
                                  "--retries", "3", *extra])
    fetch_data.main(args)
    return pd.read_csv(out / "metadata.csv")


def test_isic_download_survives_faults_and_keeps_only_the_ham10000_release(ham_sample, tmp_path, no_waiting,
                                                                           capsys):
    with FakeRemote(isic_images(ham_sample), page_size=4) as remote:
        first, second, third = ham_sample["image_id"][:3]
        remote.fault(f"/files/{first}.jpg", "503", "truncate")
        remote.fault(f"/files/{second}.jpg", "429")
        remote.fault(f"/files/{third}.jpg", "reset", "garble")  # garbled with the right size: caught as corrupt
        remote.fault("/api/v2/images/search/", "truncate", "500")
        meta = fetch(remote, tmp_path)
    printed = capsys.readouterr().out
    assert "ISIC_0030000" in printed and "no HAM10000 code" in printed
    assert f"{third}.jpg: not a readable image" in printed
    expected = ham_sample[ham_sample["image_id"] != third].set_index("image_id")
    assert sorted(meta["image_id"]) == sorted(expected.index)  # no 2018 validation/test image
    meta = meta.set_index("image_id")
    assert (meta["dx"] == expected.loc[meta.index, "label"]).all()
    assert (meta["lesion_id"] == expected.loc[meta.index, "lesion_id"]).all()
    assert (meta["dx_type"] == expected.loc[meta.index, "dx_type"]).all()
    for image_id in meta.index:
        assert (tmp_path / meta.loc[image_id, "filename"]).read_bytes() == (HAM / expected.loc[image_id, "filename"]).read_bytes()
    assert 2.0 in no_waiting  # the server's Retry-After was honoured
    assert not list(tmp_path.rglob("*.part"))
    assert "ViDIR" in (tmp_path / "attribution.txt").read_text()


def test_ham10000_and_a_challenge_collection_download_as_one_dataset(ham_sample, tmp_path):
    """The reference recipe's data from the Archive: HAM10000's release, split lesion-level, beside
    ISIC 2017's training collection, every image of which is a training image."""
    labels = pd.read_csv(ISIC2017 / "labels.csv")
    chosen = labels[labels["split"] == "train"].head(4)
    spelled = {"nv": "Nevus", "mel": "Melanoma Invasive", "bkl": "Seborrheic keratosis"}
    training = [{"isic_id": r.image_id, "body": (ISIC2017 / r.filename).read_bytes(),
                 "clinical": {"diagnosis_3": spelled[r.label]}} for r in chosen.itertuples()]
    with FakeRemote(isic_images(ham_sample), challenge_images={"Challenge 2017: Training": training}) as remote:
        meta = fetch(remote, tmp_path, "--collection", "HAM10000", "--collection", "Challenge 2017: Training")
    meta = meta.set_index("image_id")
    assert sorted(meta.index) == sorted([*ham_sample["image_id"], *chosen["image_id"]])  # no 2018 image
    assert (meta.loc[chosen["image_id"], "split"] == "train").all()
    ham = meta.loc[ham_sample["image_id"]]
    assert set(ham["split"]) == {"train", "val", "test"}  # split lesion-level, as a download of it alone
    assert ham.groupby("lesion_id")["split"].nunique().max() == 1


def test_second_run_downloads_nothing_and_an_interrupted_run_resumes(ham_sample, tmp_path):
    with FakeRemote(isic_images(ham_sample)) as remote:
        fetch(remote, tmp_path)
        remote.requests.clear()
        fetch(remote, tmp_path)
        assert remote.fetched("/files/") == []

        # an interrupted download: half of one file on disk as .part
        image_id = ham_sample["image_id"][5]
        target = tmp_path / "images" / f"{image_id}.jpg"
        whole = target.read_bytes()
        target.unlink()
        target.with_name(target.name + ".part").write_bytes(whole[:len(whole) // 2])
        remote.requests.clear()
        fetch(remote, tmp_path)
        file_requests = [(p, h) for p, h in remote.requests if p.startswith("/files/")]
    (path, headers), = file_requests
    assert path == f"/files/{image_id}.jpg" and headers.get("Range") == f"bytes={len(whole) // 2}-"
    assert target.read_bytes() == whole


def test_limit_fetches_a_partial_dataset(ham_sample, tmp_path):
    with FakeRemote(isic_images(ham_sample)) as remote:
        meta = fetch(remote, tmp_path, "--limit", "5")
        assert len(remote.fetched("/files/")) == 5
    assert len(meta) == 5


def test_isic2018_test_subset_is_all_test(ham_sample, tmp_path):
    with FakeRemote(isic_images(ham_sample)) as remote:
        meta = fetch(remote, tmp_path, "--subset", "isic2018_test")
    assert sorted(meta["image_id"]) == ["ISIC_0034600", "ISIC_0035000"]
    assert set(meta["split"]) == {"test"}
    assert meta.set_index("image_id")["dx"].to_dict() == {"ISIC_0034600": "mel", "ISIC_0035000": "bkl"}


def test_collections_by_name_keep_the_split_their_name_gives(tmp_path):
    """ISIC 2017's challenge sets as the Archive holds them: one collection per split."""
    labels = pd.read_csv(ISIC2017 / "labels.csv")
    chosen = pd.concat([labels[labels["split"] == split].head(3) for split in ("train", "val", "test")])
    names = {"train": "Challenge 2017: Training", "val": "Challenge 2017: Validation", "test": "Challenge 2017: Test"}
    spelled = {"nv": "Nevus", "mel": "Melanoma Invasive", "bkl": "Seborrheic keratosis"}
    collections = {names[split]: [{"isic_id": r.image_id, "body": (ISIC2017 / r.filename).read_bytes(),
                                   "clinical": {"diagnosis_3": spelled[r.label]}}
                                  for r in chosen[chosen["split"] == split].itertuples()] for split in names}
    with FakeRemote(challenge_images=collections) as remote:
        meta = fetch(remote, tmp_path / "out", *[f"--collection={n}" for n in names.values()])
        with pytest.raises(SystemExit) as exc:
            fetch(remote, tmp_path / "other", "--collection", "Challenge 2017: Trianing")
    assert (meta.set_index("image_id")["split"] == chosen.set_index("image_id").loc[meta["image_id"], "split"]
            .to_numpy()).all() and len(meta) == 9
    assert (meta.set_index("image_id")["dx"] == chosen.set_index("image_id").loc[meta["image_id"], "label"]
            .to_numpy()).all()
    assert "no collection named 'Challenge 2017: Trianing'" in str(exc.value)
    assert "similar: " in str(exc.value) and "Challenge 2017: Training" in str(exc.value)
    assert fetch_data.collection_split("ISIC 2019: Training") == "train"
    assert fetch_data.collection_split("HAM10000") is None


@pytest.mark.parametrize("fault, words", [("404", "HTTP 404"), ("401", "access denied"), ("403", "access denied"),
                                          ("503", "HTTP 503")])
def test_http_errors_end_with_one_line(ham_sample, tmp_path, fault, words):
    with FakeRemote(isic_images(ham_sample)) as remote:
        remote.fault("/api/v2/collections/", *[fault] * 5)
        with pytest.raises(SystemExit) as exc:
            fetch(remote, tmp_path)
    message = str(exc.value)
    assert message.startswith("error: http://127.0.0.1") and words in message and "\n" not in message
    assert not (tmp_path / "metadata.csv").exists()


def test_offline_suggests_from_dir(tmp_path, no_waiting):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = fetch_data.parse_args(["--api-url", f"http://127.0.0.1:{port}/api/v2/", "--out", str(tmp_path),
                                  "--retries", "2"])
    with pytest.raises(SystemExit) as exc:
        fetch_data.main(args)
    assert "unreachable after 3 tries" in str(exc.value) and "--from-dir" in str(exc.value)
    assert no_waiting == [1.0, 2.0]  # exponential backoff


def test_archive_diagnoses_map_to_ham10000_codes():
    expected = {"Nevus": "nv", "Melanoma Invasive": "mel", "Melanoma in situ": "mel", "Basal cell carcinoma": "bcc",
                "Solar or actinic keratosis": "akiec", "Squamous cell carcinoma in situ": "akiec",
                "Seborrheic keratosis": "bkl", "Solar lentigo": "bkl", "Lichen planus like keratosis": "bkl",
                "Dermatofibroma": "df", "Hemangioma": "vasc"}
    for diagnosis, dx in expected.items():
        assert fetch_data.isic_dx({"diagnosis_3": diagnosis}) == dx, diagnosis
    assert fetch_data.isic_dx({"diagnosis_2": "Benign melanocytic proliferations"}) == "nv"
    assert fetch_data.isic_dx({"diagnosis_3": "Scar"}) is None
    assert fetch_data.in_subset("ISIC_0024306", "ham10000") and fetch_data.in_subset("ISIC_0034320", "ham10000")
    assert not fetch_data.in_subset("ISIC_0034321", "ham10000")
    assert not fetch_data.in_subset("ISIC_0034513", "isic2018_test") and fetch_data.in_subset("ISIC_0034524", "isic2018_test")


# -- Dataverse --------------------------------------------------------------------------------


def zip_bytes(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, body in members.items():
            archive.writestr(name, body)
    return buffer.getvalue()


def md5(body):
    return hashlib.md5(body).hexdigest()


def dataverse_release(sample):
    """The official layout: two image zips, the lesion masks' zip (600x450 PNGs in a folder, from
    ham10000_full) and a metadata table (HAM10000 columns)."""
    half = len(sample) // 2
    parts = [zip_bytes({f"{r.image_id}.jpg": (HAM / r.filename).read_bytes() for r in rows.itertuples()})
             for rows in (sample[:half], sample[half:])]
    masks = zip_bytes({f"HAM10000_segmentations_lesion_tschandl/{i}_segmentation.png":
                       (HAM_FULL / "masks" / f"{i}_segmentation.png").read_bytes() for i in sample["image_id"]})
    metadata = sample.rename(columns={"label": "dx"})[["lesion_id", "image_id", "dx", "dx_type", "age", "sex",
                                                      "localization"]].to_csv(index=False).encode()
    return [{"id": 11, "name": "HAM10000_images_part_1.zip", "body": parts[0], "md5": md5(parts[0]), "tabular": False},
            {"id": 12, "name": "HAM10000_images_part_2.zip", "body": parts[1], "md5": md5(parts[1]), "tabular": False},
            {"id": 13, "name": "HAM10000_metadata.csv", "body": metadata, "md5": md5(metadata), "tabular": True},
            {"id": 14, "name": "HAM10000_segmentations_lesion_tschandl.zip", "body": masks, "md5": md5(masks),
             "tabular": False}]


def fetch_dataverse(remote, out):
    fetch_data.main(fetch_data.parse_args(["--source", "dataverse", "--dataverse-url", remote.url,
                                           "--out", str(out), "--retries", "3"]))
    return pd.read_csv(out / "metadata.csv")


def test_dataverse_release_is_verified_unpacked_and_imported(ham_sample, tmp_path, monkeypatch):
    files = dataverse_release(ham_sample)
    monkeypatch.setattr(fetch_data, "PUBLISHED_MD5", {f["name"]: f["md5"] for f in files})
    with FakeRemote(dataverse_files=files) as remote:
        remote.fault("/api/access/datafile/11", "garble")  # checksum mismatch: fetched again
        remote.fault("/api/access/datafile/12", "truncate")
        meta = fetch_dataverse(remote, tmp_path)
        assert remote.fetched("/api/access/datafile/11").count("/api/access/datafile/11") == 2
        remote.requests.clear()
        again = fetch_dataverse(remote, tmp_path)
        assert remote.fetched("/api/access/datafile/") == []  # complete files are not fetched again
    assert sorted(meta["image_id"]) == sorted(ham_sample["image_id"])
    assert meta.equals(again)
    by_id = ham_sample.set_index("image_id")
    assert (meta.set_index("image_id")["dx"] == by_id.loc[meta["image_id"], "label"].values).all()
    assert (meta.groupby("lesion_id")["split"].nunique() == 1).all()
    # the lesion masks came too: one per image, at the image's size, 0 or 255
    import cv2
    for row in meta.itertuples():
        mask = cv2.imread(str(tmp_path / row.mask), cv2.IMREAD_GRAYSCALE)
        image = cv2.imread(str(tmp_path / row.filename))
        assert mask.shape == image.shape[:2] and set(np.unique(mask)) == {0, 255}


def test_dataverse_listing_must_agree_with_the_published_md5(ham_sample, tmp_path):
    with FakeRemote(dataverse_files=dataverse_release(ham_sample)) as remote:
        with pytest.raises(SystemExit) as exc:
            fetch_dataverse(remote, tmp_path)  # the test zips are not the published ones
    assert "not the published 4639bfa73ab251610530a97c898e6e46" in str(exc.value)


def test_zip_members_leaving_the_target_are_refused_and_nothing_is_written(tmp_path):
    evil = tmp_path / "evil.zip"
    evil.write_bytes(zip_bytes({"good.jpg": b"x", "../outside.txt": b"y"}))
    target = tmp_path / "unpacked"
    with pytest.raises(common.ToolkitError) as exc:
        fetch_data.safe_extract(evil, target)
    assert "../outside.txt" in str(exc.value)
    assert not (tmp_path / "outside.txt").exists() and not (target / "good.jpg").exists()
    absolute = tmp_path / "absolute.zip"
    absolute.write_bytes(zip_bytes({"/etc/evil": b"y"}))
    with pytest.raises(common.ToolkitError):
        fetch_data.safe_extract(absolute, target)


def test_isic_challenge_ground_truth_imports_as_an_external_test_set(ham_sample, tmp_path):
    root = tmp_path / "isic2018_test"
    (root / "ISIC2018_Task3_Test_Input").mkdir(parents=True)
    codes = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    rows = []
    for r in ham_sample.itertuples():
        (root / "ISIC2018_Task3_Test_Input" / f"{r.image_id}.jpg").write_bytes((HAM / r.filename).read_bytes())
        rows.append({"image": r.image_id, **{c: float(c.lower() == r.label) for c in codes}})
    pd.DataFrame(rows).to_csv(root / "ISIC2018_Task3_Test_GroundTruth.csv", index=False)
    fetch_data.main(fetch_data.parse_args(["--from-dir", str(root), "--labels",
                                           str(root / "ISIC2018_Task3_Test_GroundTruth.csv"),
                                           "--assign-split", "test", "--out", str(tmp_path / "out")]))
    meta = pd.read_csv(tmp_path / "out" / "metadata.csv")
    assert set(meta["split"]) == {"test"}
    assert (meta.set_index("image_id")["dx"] == ham_sample.set_index("image_id").loc[meta["image_id"], "label"].values).all()
