"""Step 1: put a dataset in data/<dataset>/ with lesion-level train/val/test splits.

Writes data/<dataset>/images/* and data/<dataset>/metadata.csv with the columns
image_id, filename (relative to the dataset folder), lesion_id, dx, malignant (0/1), split,
source, plus mask (masks/<image_id>.png, ground truth at the image's size) where the source has
lesion masks, and whatever clinical columns it had (age, sex, localization, dx_type...).
Splits are grouped by lesion_id (a lesion never sits in two splits) and stratified by dx.

Sources:
  --source isic        the ISIC Archive API (default): the HAM10000 collection, image by image;
                       --collection NAME any other collection (the ISIC 2017 challenge sets, say);
                       --collection HAM10000 --collection 'Challenge 2017: Training' both in one
  --source dataverse   the official release on Harvard Dataverse, with its lesion masks: zips
                       checked against their MD5
  --from-dir PATH      a copy you already have: a labels CSV (metadata.csv, labels.csv,
                       HAM10000_metadata.csv, an ISIC one-hot ground truth, or --labels) with an
                       image id and a diagnosis (dx or label); images at its filename column
                       (relative to PATH) or anywhere below PATH; optional columns lesion_id,
                       split (train/val/test, kept) and mask (a ground-truth mask, any size).
                       Several folders (--from-dir A B) make one dataset: each row's source is its
                       folder's name, lesion ids are kept apart per source.
  --synthetic N        N synthetic dermoscopy images with ground-truth masks (demo and tests)
Splits a source gives (a split column, an ISIC collection named for a split) are kept; its other
rows are split lesion-level: into train and val when it gives a test split, else into train, val
and test. --assign-split puts every row in one split (an external test set).
--subset isic2018_test takes the 1,512 ISIC 2018 Task 3 test images instead of the 10,015 of the
HAM10000 release, every row split=test. A second run downloads nothing that is complete; an
interrupted one resumes.

Examples: python fetch_data.py --from-dir ../shared/data/ham10000_full --out data/hamfull
          python fetch_data.py --from-dir ../shared/data/ham10000_full ../shared/data/isic2017 --out data/ham+isic2017
"""
import http.client
import json
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from common import (DX_CODES, METADATA_COLUMNS, SAFE_NAME, SPLITS, ArgumentParser, ToolkitError, atomic_path,
                    check_names, fail, file_digest, files_by_stem, is_malignant, lock_output, masks_by_image_id,
                    number_in, one_line_errors, read_csv, read_mask, read_rgb, write_csv, write_png)

# How a labels column may spell a diagnosis, mapped to the HAM10000 code. PH2 has no dx codes:
# its nevi (common and atypical) are nv, its melanomas mel.
DX_ALIASES = {
    "melanocytic nevi": "nv", "nevus": "nv", "common_nevus": "nv", "atypical_nevus": "nv",
    "melanoma": "mel", "benign keratosis-like lesions": "bkl", "basal cell carcinoma": "bcc",
    "actinic keratoses": "akiec", "vascular lesions": "vasc", "dermatofibroma": "df",
}
LABEL_FILES = ("metadata.csv", "labels.csv", "HAM10000_metadata.csv", "HAM10000_metadata")
ISIC_API = "https://api.isic-archive.com/api/v2/"
DATAVERSE = "https://dataverse.harvard.edu"
HAM10000_DOI = "doi:10.7910/DVN/DBW86T"
# The Archive's HAM10000 collection also holds the ISIC 2018 validation (ISIC_0034321-0034513)
# and test images; the HAM10000 release itself is ISIC_0024306-ISIC_0034320 (10,015 images).
HAM10000_IDS = (24306, 34320)
ISIC2018_VALIDATION_IDS = (34321, 34513)
# MD5 sums published with the Dataverse record; the record's own listing must agree.
PUBLISHED_MD5 = {"HAM10000_images_part_1.zip": "4639bfa73ab251610530a97c898e6e46",
                 "HAM10000_images_part_2.zip": "da43d6cc50f6613013be07e8986b384b"}
# The Archive's 2024 diagnosis taxonomy (diagnosis_3, else diagnosis_2) to HAM10000 codes.
# akiec = actinic keratosis + intraepithelial carcinoma (Bowen's, SCC in situ);
# bkl = seborrheic keratosis + solar lentigo + lichen-planus-like keratosis.
ISIC_DIAGNOSIS_TO_DX = {
    "nevus": "nv", "blue nevus": "nv", "combined nevus": "nv", "congenital nevus": "nv",
    "dermal nevus": "nv", "junctional nevus": "nv", "compound nevus": "nv", "recurrent nevus": "nv",
    "spitz nevus": "nv", "reed nevus": "nv", "halo nevus": "nv",
    "melanoma": "mel", "melanoma invasive": "mel", "melanoma in situ": "mel", "melanoma, nos": "mel",
    "melanoma metastasis": "mel",
    "basal cell carcinoma": "bcc",
    "solar or actinic keratosis": "akiec", "actinic keratosis": "akiec",
    "squamous cell carcinoma in situ": "akiec", "bowen's disease": "akiec",
    "seborrheic keratosis": "bkl", "solar lentigo": "bkl", "lichen planus like keratosis": "bkl",
    "pigmented benign keratosis": "bkl",
    "dermatofibroma": "df",
    "hemangioma": "vasc", "angioma": "vasc", "angiokeratoma": "vasc", "pyogenic granuloma": "vasc",
    "hemorrhage": "vasc", "vascular lesion": "vasc",
    # groups (diagnosis_2), used when diagnosis_3 is missing
    "benign melanocytic proliferations": "nv",
    "malignant melanocytic proliferations (melanoma)": "mel",
    "malignant adnexal epidermal proliferations": "bcc",
    "indeterminate epidermal proliferations": "akiec",
    "malignant epidermal proliferations": "akiec",
    "benign epidermal proliferations": "bkl",
    "flat melanotic pigmentations - not melanocytic nevus": "bkl",
    "benign soft tissue proliferations - fibro-histiocytic": "df",
    "benign soft tissue proliferations - vascular": "vasc",
}
# Official HAM10000 class frequencies (10,015 images), so synthetic data has the real imbalance.
HAM10000_DX_COUNTS = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--source", choices=["isic", "dataverse"], default="isic", help="download HAM10000")
    source.add_argument("--from-dir", type=Path, nargs="+", action="extend", metavar="PATH",
                        help="import a local copy; several folders (--from-dir A B) make one dataset with a "
                             "'source' column")
    source.add_argument("--synthetic", type=number_in(int, 20), metavar="N",
                        help="generate N synthetic images (20 or more, to make three splits)")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to write, e.g. data/ham10000")
    p.add_argument("--subset", choices=["ham10000", "isic2018_test"], default="ham10000",
                   help="downloads: the HAM10000 release, or the ISIC 2018 Task 3 test set")
    p.add_argument("--collection", action="append", metavar="NAME",
                   help="--source isic: download this ISIC Archive collection instead of HAM10000 (repeat for "
                        "several); a collection named for a split ('Challenge 2017: Test') gives its images that split; "
                        "one named HAM10000 gives the release's 10,015 images, split lesion-level")
    p.add_argument("--labels", type=Path, help="labels CSV for --from-dir (default: found by name)")
    p.add_argument("--assign-split", choices=SPLITS, help="put every row in this split (an external test set)")
    p.add_argument("--only-split", choices=SPLITS, nargs="+", metavar="SPLIT",
                   help="--from-dir: import only the rows that fall in these splits (train, val, test; given in "
                        "the labels or assigned); the other images are never opened")
    p.add_argument("--val-frac", type=number_in(float, 0, 1), default=0.15, help="fraction of lesions for validation")
    p.add_argument("--test-frac", type=number_in(float, 0, 1, low_open=True), default=0.15,
                   help="fraction of lesions for test")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the synthetic images")
    p.add_argument("--limit", type=number_in(int, 1),
                   help="only the first N images (of each --from-dir source): a quick partial fetch")
    p.add_argument("--retries", type=number_in(int, 0), default=5,
                   help="tries after the first, with exponential backoff")
    p.add_argument("--api-url", default=ISIC_API, help="ISIC Archive API base URL")
    p.add_argument("--dataverse-url", default=DATAVERSE, help="Dataverse server")
    p.add_argument("--image-size", type=number_in(int, 32), default=160, help="side of synthetic images (4:3)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# lesion-level splits

SPLIT_FOLDS = 20  # fractions are realised in steps of 1/20 of the lesions


def lesion_splits(df, val_frac, test_frac, seed):
    """A split label per row, grouped by lesion_id and stratified by dx, using scikit-learn's
    StratifiedGroupKFold: fold k of n goes to test while (k + 1/2) / n < test_frac, then to val
    while below test_frac + val_frac, then to train. Datasets too small to stratify by dx are
    stratified by malignancy."""
    from sklearn.model_selection import StratifiedGroupKFold
    if test_frac + val_frac >= 1:
        raise ValueError("val and test fractions leave nothing to train on")
    strata = df["dx"]
    n_folds = min(SPLIT_FOLDS, df["lesion_id"].nunique())
    if strata.value_counts().max() < n_folds:
        strata = df["malignant"]
    n_folds = max(2, min(n_folds, strata.value_counts().max()))
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    split = np.empty(len(df), dtype=object)
    with warnings.catch_warnings():
        # Rare classes (df, vasc) having fewer lesions than folds is expected, not a problem.
        warnings.filterwarnings("ignore", message="The least populated class")
        for fold, (_, fold_rows) in enumerate(folds.split(df, strata, groups=df["lesion_id"])):
            position = (fold + 0.5) / n_folds
            split[fold_rows] = "test" if position < test_frac else "val" if position < test_frac + val_frac else "train"
    return split


def finish_metadata(df, args, assign=True):
    """Fill lesion ids, malignancy and splits, and order the columns. Splits a source gives are
    kept; its other rows are split lesion-level, into train and val only when it gives a test split
    of its own (ham10000_full's untouched lesions, say), else into train, val and test.
    --assign-split (with assign) puts every row in one split."""
    df = df.copy()
    if "split" not in df.columns:
        df = given_splits(df, "metadata")  # synthetic data or a download that gives no split
    if "source" not in df.columns:
        df.insert(0, "source", "synthetic" if args.synthetic is not None else args.source)
    df["malignant"] = df["dx"].map(is_malignant)
    df["split"] = df["split"].astype(object)
    if args.assign_split and assign:
        df["split"] = args.assign_split
    for _, rows in df[df["split"].isna()].groupby("source", sort=False):
        test_given = (df.loc[df["source"] == rows["source"].iloc[0], "split"] == "test").any()
        df.loc[rows.index, "split"] = lesion_splits(rows.reset_index(drop=True), args.val_frac,
                                                    0.0 if test_given else args.test_frac, args.seed)
    rest = [c for c in df.columns if c not in METADATA_COLUMNS]
    return df[list(METADATA_COLUMNS) + rest]


def write_dataset(df, out_dir):
    write_csv(df, out_dir / "metadata.csv")
    counts = df.groupby(["split", "dx"]).size().unstack(fill_value=0)
    print(f"wrote {out_dir / 'metadata.csv'}: {len(df)} images, {df['lesion_id'].nunique()} lesions")
    print(counts.reindex(index=[s for s in SPLITS if s in counts.index]).to_string())
    if df["source"].nunique() > 1:
        print(df.groupby(["source", "split"]).size().unstack(fill_value=0).reindex(columns=SPLITS, fill_value=0)
              .to_string())


# ---------------------------------------------------------------------------------------------
# synthetic dermoscopy


def smooth_noise(rng, shape, cells):
    """Smooth random field in [-1, 1]: a coarse grid of normals, upsampled."""
    import cv2
    coarse = rng.normal(size=(cells, cells)).astype(np.float32)
    field = cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return field / (np.abs(field).max() + 1e-6)


def synthetic_lesion_params(rng, malignant):
    """What stays the same across the images of one lesion. Malignant lesions have irregular,
    asymmetric borders (strong high harmonics) and variegated colour (dark and blue-grey
    blotches); benign ones are round and evenly brown. Real lesions overlap more than this."""
    harmonics = np.arange(2, 9)
    if malignant:
        amplitude = rng.uniform(0.0, 0.07, len(harmonics))
    else:
        amplitude = rng.uniform(0.0, 0.04, len(harmonics))
    return {
        "radius": rng.uniform(0.16, 0.30),
        "harmonics": harmonics, "amplitude": amplitude,
        "phase": rng.uniform(0, 2 * np.pi, len(harmonics)),
        "colour": np.array([rng.uniform(110, 160), rng.uniform(65, 100), rng.uniform(40, 70)]),
        "variegation": rng.uniform(0.15, 0.9) if malignant else rng.uniform(0.0, 0.35),
        "skin": np.array([rng.uniform(205, 240), rng.uniform(150, 190), rng.uniform(125, 165)]),
    }


def synthetic_image(rng, lesion, width, height, hairs=True):
    """One image of a lesion: (rgb uint8, ground-truth lesion mask bool, hair mask bool).
    With hairs=False and the same rng state, the same image without its hairs."""
    import cv2
    shape = (height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    side = min(width, height)
    cx = width / 2 + rng.normal(0, 0.05 * side)
    cy = height / 2 + rng.normal(0, 0.05 * side)
    rotation = rng.uniform(0, 2 * np.pi)  # each image of a lesion is taken at another angle
    theta = np.arctan2(yy - cy, xx - cx) + rotation
    border = 1 + sum(a * np.cos(k * theta + ph) for k, a, ph in
                     zip(lesion["harmonics"], lesion["amplitude"], lesion["phase"]))
    radius = lesion["radius"] * side * border
    distance = np.hypot(yy - cy, xx - cx)
    mask = distance < radius

    image = lesion["skin"] * (1 + 0.04 * smooth_noise(rng, shape, 6))[..., None]
    # Pigment fades out over a few pixels at the border, darker towards the centre.
    alpha = np.clip((radius - distance) / (0.08 * side) + 0.5, 0, 1)[..., None]
    depth = np.clip(1 - distance / np.maximum(radius, 1), 0, 1)[..., None]
    pigment = lesion["colour"] * (1 - 0.35 * depth)
    blotch = smooth_noise(rng, shape, 7)[..., None]
    dark = np.array([45, 30, 25.0])
    blue_grey = np.array([95, 105, 130.0])
    v = lesion["variegation"]
    pigment = pigment + v * np.clip(blotch, 0, 1) * (dark - pigment) + v * np.clip(-blotch, 0, 1) * (blue_grey - pigment)
    image = image * (1 - alpha) + pigment * alpha
    image += rng.normal(0, 3, image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)

    # Hairs come from a stream of their own, so the same image can be drawn without them.
    hair_rng = np.random.default_rng(rng.integers(2 ** 32))
    hair = np.zeros(shape, np.uint8)
    for _ in range(hair_rng.integers(0, 7) if hairs else 0):
        # a gently curving stroke: a random walk of the heading
        heading = hair_rng.uniform(0, 2 * np.pi) + np.cumsum(hair_rng.normal(0, 0.12, 24))
        steps = side / 22 * np.stack([np.cos(heading), np.sin(heading)], axis=1)
        points = np.cumsum(steps, axis=0) + hair_rng.uniform(0, side, 2)
        cv2.polylines(hair, [points.astype(np.int32)], False, 1, thickness=int(hair_rng.integers(1, 3)))
    image[hair > 0] = hair_rng.uniform(20, 50, 3).astype(np.uint8)

    # The dark circular vignette of a dermatoscope's field of view.
    corner = np.hypot(yy - height / 2, xx - width / 2) / (0.5 * np.hypot(width, height))
    edge = rng.uniform(0.85, 1.05)
    shade = np.clip(1 - (corner - edge) / 0.08, 0.05, 1)[..., None]
    image = (image * shade).astype(np.uint8)
    return image, mask, hair > 0


def make_synthetic(n, out_dir, width, height, seed):
    """n images of about 0.8 n lesions; some lesions are photographed two or three times, as
    in HAM10000, so the lesion-level split has something to do."""
    rng = np.random.default_rng(seed)
    dx_names = list(HAM10000_DX_COUNTS)
    dx_p = np.array(list(HAM10000_DX_COUNTS.values()), float)
    rows = []
    lesion_number = 0
    with tqdm(total=n, desc="synthetic images") as bar:
        while len(rows) < n:
            lesion_number += 1
            dx = dx_names[rng.choice(len(dx_names), p=dx_p / dx_p.sum())]
            lesion = synthetic_lesion_params(rng, is_malignant(dx))
            for _ in range(min(rng.choice([1, 2, 3], p=[0.75, 0.17, 0.08]), n - len(rows))):
                image_id = f"SYN_{len(rows):05d}"
                image, mask, _ = synthetic_image(rng, lesion, width, height)
                write_png(out_dir / "images" / f"{image_id}.png", image)
                write_png(out_dir / "masks" / f"{image_id}.png", mask.astype(np.uint8) * 255)
                rows.append({"image_id": image_id, "filename": f"images/{image_id}.png",
                             "lesion_id": f"SYN_L{lesion_number:05d}", "dx": dx,
                             "mask": f"masks/{image_id}.png"})
                bar.update()
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# HTTP with retries

RETRY_STATUSES = {429, 500, 502, 503, 504}
RETRY_BASE_SECONDS = 1.0
MAX_WAIT_SECONDS = 120
# A body cut short, a reset connection, a timeout: worth another try.
TRANSIENT_ERRORS = (http.client.HTTPException, urllib.error.URLError, TimeoutError, ConnectionError)
OFFLINE_HINT = "is the network reachable? Without it, download HAM10000 yourself and use --from-dir PATH"


def sleep(seconds):
    time.sleep(seconds)


def backoff(attempt, retry_after=None):
    """Seconds to wait before try attempt+1: the server's Retry-After if it sent one, else
    exponential backoff."""
    if retry_after is not None:
        try:
            return min(float(retry_after), MAX_WAIT_SECONDS)
        except ValueError:
            pass  # an HTTP date rather than seconds: fall back to our own schedule
    return min(RETRY_BASE_SECONDS * 2 ** attempt, MAX_WAIT_SECONDS)


def http_open(url, retries, headers=None):
    """urlopen that retries 429 (honouring Retry-After), 5xx, timeouts and dropped
    connections, and ends with one line on 401/403/404 or when the server stays unreachable."""
    request = urllib.request.Request(url, headers={"User-Agent": "skin-lesion-toolkit", **(headers or {})})
    for attempt in range(retries + 1):
        try:
            return urllib.request.urlopen(request, timeout=60)
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                fail(url, f"HTTP {e.code}: access denied; the data is public, so the URL may have "
                     "expired or changed: run again, or use --from-dir PATH")
            if e.code == 404:
                fail(url, "HTTP 404: not found; the API may have changed: check --api-url/--dataverse-url")
            if e.code not in RETRY_STATUSES or attempt == retries:
                fail(url, f"HTTP {e.code} {e.reason} after {attempt + 1} tries")
            wait = backoff(attempt, e.headers.get("Retry-After"))
        except TRANSIENT_ERRORS as e:
            if attempt == retries:
                fail(url, f"unreachable after {attempt + 1} tries ({getattr(e, 'reason', e)}); {OFFLINE_HINT}")
            wait = backoff(attempt)
        sleep(wait)


def get_json(url, retries):
    """GET a JSON document; a body cut short or garbled is fetched again."""
    for attempt in range(retries + 1):
        try:
            with http_open(url, retries) as response:
                return json.loads(response.read())
        except (*TRANSIENT_ERRORS, json.JSONDecodeError, UnicodeDecodeError) as e:
            if attempt == retries:
                fail(url, f"no complete JSON answer after {attempt + 1} tries ({type(e).__name__})")
            sleep(backoff(attempt))


def paginate(url, retries):
    """Every result of a paginated API listing, following `next` until it is null."""
    while url:
        page = get_json(url, retries)
        yield from page.get("results", [])
        url = page.get("next")


def is_complete(path, size=None, md5=None):
    return path.is_file() and (size is None or path.stat().st_size == size) and \
        (md5 is None or file_digest(path, "md5") == md5)


def download(url, target, retries, size=None, md5=None, bar=None):
    """Download url to target through target.part, resuming a part left by an interrupted run
    (HTTP Range). The part is renamed only when its size matches what the server announced
    and the expected size and MD5 where they are known; a short or corrupt body is fetched again."""
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have > size:
            part.unlink()
            have = 0
        try:
            if size is None or have < size:
                headers = {"Range": f"bytes={have}-"} if have else {}
                with http_open(url, retries, headers) as response:
                    if have and response.status != 206:  # the server ignored the range: start over
                        have = 0
                    length = response.headers.get("Content-Length")
                    announced = have + int(length) if length is not None else None
                    with open(part, "ab" if have else "wb") as f:
                        for block in iter(lambda: response.read(1 << 20), b""):
                            f.write(block)
                            if bar is not None:
                                bar.update(len(block))
                got = part.stat().st_size
                if announced is not None and got != announced:
                    raise http.client.IncompleteRead(b"", announced - got)
            if size is not None and part.stat().st_size != size:
                raise http.client.IncompleteRead(b"", size - part.stat().st_size)
            if md5 is not None and file_digest(part, "md5") != md5:
                part.unlink()
                raise ValueError("MD5 checksum mismatch")
            part.replace(target)
            return
        except (*TRANSIENT_ERRORS, ValueError) as e:
            if attempt == retries:
                fail(url, f"download failed after {attempt + 1} tries ({type(e).__name__}: {e}); {OFFLINE_HINT}")
            sleep(backoff(attempt))


def check_free_space(folder, needed_bytes):
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed_bytes * 1.05 > free:
        fail(folder, f"needs {needed_bytes / 1e9:.1f} GB free for the download, has {free / 1e9:.1f} GB")


def safe_extract(zip_path, target):
    """Unpack a zip only after every member path is checked to stay inside target; a member
    that would land elsewhere (absolute, '..', a drive) refuses the whole archive."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            root = target.resolve()
            for member in archive.infolist():
                destination = (root / member.filename).resolve()
                if member.filename.startswith(("/", "\\")) or not destination.is_relative_to(root):
                    fail(zip_path, f"member {member.filename!r} would be written outside {target}; "
                         "nothing was extracted")
            archive.extractall(target)
    except zipfile.BadZipFile as e:
        zip_path.unlink()  # a corrupt archive is fetched again on the next run
        fail(zip_path, f"not a valid zip ({e}); removed, run again to download it anew")


# ---------------------------------------------------------------------------------------------
# the ISIC Archive


def isic_number(isic_id):
    try:
        return int(str(isic_id).split("_")[-1])
    except ValueError:
        return -1


def in_subset(isic_id, subset):
    n = isic_number(isic_id)
    if subset == "ham10000":
        return HAM10000_IDS[0] <= n <= HAM10000_IDS[1]
    return n > ISIC2018_VALIDATION_IDS[1]  # the ISIC 2018 Task 3 test images


def isic_dx(clinical):
    """HAM10000 code of an Archive image's clinical metadata, or None when it has no match."""
    for field in ("diagnosis_3", "diagnosis_2", "diagnosis"):
        value = clinical.get(field)
        if value and str(value).strip().lower() in ISIC_DIAGNOSIS_TO_DX:
            return ISIC_DIAGNOSIS_TO_DX[str(value).strip().lower()]
    return None


def find_isic_collections(api, retries, names):
    """The Archive's collections of these names (exact, any case); without names, HAM10000's."""
    url = urllib.parse.urljoin(api, "collections/?limit=100")
    listing = [c for c in paginate(url, retries) if isinstance(c, dict) and "id" in c and "name" in c]
    if not names:
        named = [c for c in listing if "ham10000" in str(c.get("name", "")).lower()]
        if not named:
            fail(url, "no collection named HAM10000 found")
        # the collection named exactly HAM10000 rather than one that only mentions it
        named.sort(key=lambda c: (str(c["name"]).strip().lower() != "ham10000", c["id"]))
        return named[:1]
    by_name = {str(c.get("name", "")).strip().lower(): c for c in listing}
    chosen = []
    for name in names:
        if name.strip().lower() not in by_name:
            words = re.findall(r"\w+", name.lower())
            similar = [str(c["name"]) for c in listing if any(w in str(c["name"]).lower() for w in words)]
            fail(url, f"lists no collection named {name!r}" + (f"; similar: {'; '.join(similar[:6])}" if similar
                                                                 else ""))
        chosen.append(by_name[name.strip().lower()])
    return chosen


def collection_split(name):
    """The split a collection's name gives its images ('Challenge 2017: Training' is train), or None."""
    for word in re.findall(r"[a-z]+", str(name).lower()):
        if word in SPLIT_ALIASES:
            return SPLIT_ALIASES[word]
    return None


def isic_rows(args, collection, split, search, seen):
    """The rows of one collection's images (all given `split`) that have a HAM10000 diagnosis; ids
    already in `seen` (an earlier collection) are left out, unless that collection gave them another split."""
    rows, unmapped = [], []
    # the HAM10000 collection, named or by default, gives the release (or --subset) alone
    release = not args.collection or str(collection["name"]).strip().lower() == "ham10000"
    for image in tqdm(paginate(search, args.retries), desc="listing images", unit="image"):
        isic_id = str(image.get("isic_id"))
        if not SAFE_NAME.fullmatch(isic_id):  # it becomes a file name below
            print(f"skipped image {isic_id!r} of {search}: its id cannot be a file name")
            continue
        if release and not in_subset(isic_id, args.subset):
            continue
        if isic_id in seen:
            if seen[isic_id] != split:
                fail(search, f"image {isic_id} is also in a collection of split {seen[isic_id]}, not {split}")
            continue
        clinical = (image.get("metadata") or {}).get("clinical") or {}
        dx = isic_dx(clinical)
        if dx is None:
            unmapped.append(f"{isic_id} ({clinical.get('diagnosis_3') or clinical.get('diagnosis_2')})")
            continue
        seen[isic_id] = split
        full = image["files"]["full"]
        rows.append({"image_id": isic_id, "filename": f"images/{isic_id}.jpg",
                     "lesion_id": clinical.get("lesion_id"), "dx": dx, "split": split,
                     "dx_type": clinical.get("diagnosis_confirm_type"), "age": clinical.get("age_approx"),
                     "sex": clinical.get("sex"), "localization": clinical.get("anatom_site_general"),
                     "collection": collection["name"], "copyright_license": image.get("copyright_license"),
                     "attribution": image.get("attribution"), "url": full["url"], "size": full.get("size")})
        if args.limit and len(seen) >= args.limit:
            break
    for item in unmapped:
        print(f"skipped {item}: diagnosis has no HAM10000 code")
    if unmapped:
        print(f"skipped {len(unmapped)} images of {collection['name']} whose diagnosis has no HAM10000 code")
    return rows


def fetch_isic(args):
    rows, seen = [], {}
    for collection in find_isic_collections(args.api_url, args.retries, args.collection):
        split = collection_split(collection["name"]) if args.collection else None
        print(f"ISIC Archive collection {collection['id']}: {collection['name']}"
              + (f" (split {split})" if split else ""))
        search = urllib.parse.urljoin(args.api_url, f"images/search/?collections={collection['id']}&limit=100")
        rows += isic_rows(args, collection, split, search, seen)
        if args.limit and len(seen) >= args.limit:
            break
    if not rows:
        fail(search, "no " + ("images with a HAM10000 diagnosis" if args.collection else f"{args.subset} images")
             + " found in the collection")

    todo = [r for r in rows if not is_complete(args.out / r["filename"], r["size"])]
    print(f"{len(rows)} images, {len(rows) - len(todo)} already complete, {len(todo)} to download")
    check_free_space(args.out, sum(r["size"] or 0 for r in todo))
    with tqdm(total=sum(r["size"] or 0 for r in todo), unit="B", unit_scale=True, desc="downloading") as bar:
        for r in todo:
            # the signed URLs expire, so they come from this run's listing, never from a file
            download(r["url"], args.out / r["filename"], args.retries, size=r["size"], bar=bar)
    df = pd.DataFrame(rows).drop(columns=["url", "size"])
    if not args.collection:
        df = df.drop(columns=["split", "collection"])
    attribution = df.groupby(["attribution", "copyright_license"], dropna=False).size()
    with atomic_path(args.out / "attribution.txt") as tmp:
        tmp.write_text("".join(f"{n} images: {a} ({lic})\n" for (a, lic), n in attribution.items()))
    df.insert(0, "source", "isic")
    readable = import_rows(given_splits(df, search).assign(root_dir=str(args.out)), args.out)
    for filename in set(df["filename"]) - set(readable["filename"]):
        (args.out / filename).unlink(missing_ok=True)  # corrupt: fetched again on the next run
    return readable


# ---------------------------------------------------------------------------------------------
# Harvard Dataverse


def dataverse_files(args):
    url = f"{args.dataverse_url.rstrip('/')}/api/datasets/:persistentId/?persistentId={HAM10000_DOI}"
    record = get_json(url, args.retries)
    try:
        files = record["data"]["latestVersion"]["files"]
    except (KeyError, TypeError):
        fail(url, "answer has no data.latestVersion.files; has the Dataverse API changed?")
    listing = {}
    for entry in files:
        data_file = entry.get("dataFile", {})
        name = data_file.get("originalFileName") or data_file.get("filename") or entry.get("label")
        md5 = data_file.get("md5") or (data_file.get("checksum") or {}).get("value")
        listing[name] = {"id": data_file["id"], "md5": md5, "tabular": bool(data_file.get("originalFileName"))}
    return listing, url


def pick_file(listing, prefix, url):
    for name in sorted(listing):
        if name.lower().startswith(prefix.lower()):
            return name
    fail(url, f"the record lists no file starting with {prefix!r}")


def fetch_dataverse(args):
    listing, url = dataverse_files(args)
    masks = None
    if args.subset == "ham10000":
        masks = pick_file(listing, "HAM10000_segmentations_lesion_tschandl", url)
        names = [pick_file(listing, "HAM10000_images_part_1", url), pick_file(listing, "HAM10000_images_part_2", url),
                 masks]
        labels = pick_file(listing, "HAM10000_metadata", url)
    else:
        names = [pick_file(listing, "ISIC2018_Task3_Test_Images", url)]
        labels = pick_file(listing, "ISIC2018_Task3_Test_GroundTruth", url)
    for name in names:
        if name in PUBLISHED_MD5 and listing[name]["md5"] != PUBLISHED_MD5[name]:
            fail(url, f"lists MD5 {listing[name]['md5']} for {name}, not the published {PUBLISHED_MD5[name]}")

    raw = args.out / "raw"
    base = f"{args.dataverse_url.rstrip('/')}/api/access/datafile/"
    for name in [*names, labels]:
        entry = listing[name]
        target = raw / name
        if is_complete(target, md5=entry["md5"]):
            print(f"{target} is complete")
            continue
        # Tabular files are served converted unless the original is asked for.
        file_url = base + str(entry["id"]) + ("?format=original" if entry["tabular"] else "")
        with tqdm(unit="B", unit_scale=True, desc=name) as bar:
            download(file_url, target, args.retries, md5=entry["md5"], bar=bar)
    for name in names:
        done = raw / (name + ".extracted")
        if not done.exists():
            print(f"extracting {name}")
            safe_extract(raw / name, raw / Path(name).stem)
            done.touch()
    df = read_source(raw, raw / labels, args.limit, masks_dir=raw / Path(masks).stem if masks else None)
    df["source"] = "dataverse"
    return import_rows(df, args.out, link=True)


# ---------------------------------------------------------------------------------------------
# local import


def find_labels_file(root):
    for name in LABEL_FILES:
        if (root / name).is_file():
            return root / name
    fail(root, f"no labels file found (looked for {', '.join(LABEL_FILES)}); pass --labels")


def normalise_dx(labels, path):
    """Map a labels column to HAM10000 dx codes, or end naming the values it cannot map."""
    text = labels.astype(object).fillna("").astype(str).str.strip()
    dx = text.str.lower().map(lambda v: v if v in DX_CODES else DX_ALIASES.get(v))
    if dx.isna().any():
        row = int(np.flatnonzero(dx.isna().to_numpy())[0])
        value = text.iloc[row]
        unknown = sorted(text[dx.isna()].unique())
        fail(path, f"line {row + 2}: {labels.name} " + (f"{value!r} is not a known diagnosis" if value else "is empty")
             + f" ({len(unknown)} unknown value(s) in all); expected HAM10000 codes ({', '.join(DX_CODES)}) "
             f"or one of {', '.join(sorted(DX_ALIASES))}")
    return dx


def read_labels(path):
    """A labels table with image_id and dx, whichever of the usual layouts it comes in: HAM10000
    metadata (image_id, dx), a plain labels file (image_id, label) or an ISIC challenge ground
    truth (image, then one-hot MEL, NV, BCC, AKIEC, BKL, DF, VASC columns). A split column, where
    there is one, is checked (given_splits)."""
    df = read_csv(path)
    df = df.rename(columns={c: "image_id" for c in ("image", "isic_id") if c in df.columns and "image_id" not in df})
    if "image_id" not in df.columns:
        fail(path, "needs an image id column (image_id, image or isic_id)")
    df["image_id"] = df["image_id"].astype(str)
    one_hot = [c for c in df.columns if c.lower() in DX_CODES]
    if "dx" in df.columns or "label" in df.columns:
        df["dx"] = normalise_dx(df["dx" if "dx" in df.columns else "label"], path)
    elif len(one_hot) == len(DX_CODES):
        df["dx"] = df[one_hot].idxmax(axis=1).str.lower()
        df = df.drop(columns=one_hot)
    else:
        fail(path, "needs a diagnosis: a 'dx' or 'label' column, or one-hot columns " + ", ".join(DX_CODES).upper())
    if df["image_id"].duplicated().any():
        fail(path, f"image_id {df['image_id'][df['image_id'].duplicated()].iloc[0]} appears twice")
    check_names(df, path)
    return given_splits(df.drop(columns=[c for c in ("label", "binary") if c in df.columns]), path)


# How a split column may spell a split; an empty cell means "not given": split lesion-level.
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}


def given_splits(df, path):
    """Fill lesion ids (an image without one is a lesion of its own) and check the split column:
    every value a split, one split per lesion; a lesion's images without a split take its given
    one. Rows without any given split keep NaN, for finish_metadata to split."""
    df = df.copy()
    lesion = df["lesion_id"] if "lesion_id" in df.columns else pd.Series(np.nan, index=df.index)
    df["lesion_id"] = lesion.where(lesion.notna() & (lesion.astype(str) != ""), df["image_id"]).astype(str)
    if "split" not in df.columns:
        df["split"] = np.nan
        return df
    text = df["split"].astype(object).fillna("").astype(str).str.strip().str.lower()
    split = text.map(SPLIT_ALIASES)
    bad = (text != "") & split.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        fail(path, f"line {row + 2}: split {df['split'].iloc[row]!r} is not train, val or test (or empty: split "
             "lesion-level)")
    per_lesion = split.groupby(df["lesion_id"]).nunique()
    if (per_lesion > 1).any():
        lesion_id = per_lesion.index[per_lesion > 1][0]
        found = sorted(split[df["lesion_id"] == lesion_id].dropna().unique())
        fail(path, f"lesion {lesion_id} has images in more than one split ({', '.join(found)}); a lesion "
             "belongs to one split")
    df["split"] = split.fillna(df["lesion_id"].map(split.groupby(df["lesion_id"]).first()))
    return df


def source_name(root):
    """A source's name, from its folder: it labels the rows and keeps ids of sources apart."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", Path(root).resolve().name) or "source"


def read_source(root, labels_path=None, limit=None, masks_dir=None):
    """One local source's rows: labels, image filename and mask (both relative to root, masks found
    in masks_dir where the labels have no mask column) and the given splits. Reads no image."""
    if not root.is_dir():
        fail(root, "not a folder")
    labels_path = labels_path or find_labels_file(root)
    df = read_labels(labels_path)
    if limit:
        df = df.head(limit).copy()
    # Where no filename column is given (the official layout), images sit in any sub-folder.
    if "filename" not in df.columns:
        found = files_by_stem(root)
        df["filename"] = [found.get(i, f"{i}.jpg") for i in df["image_id"]]
    if "mask" not in df.columns and masks_dir is not None:
        masks = masks_by_image_id(masks_dir, df["image_id"])
        df["mask"] = [(masks_dir / masks[i]).relative_to(root).as_posix() if i in masks else np.nan
                      for i in df["image_id"]]
    # a labels file of our own (a dataset made of several sources) keeps its source column
    given = df.pop("source").astype(object) if "source" in df.columns else pd.Series(np.nan, index=df.index)
    df.insert(0, "source", given.where(given.notna() & (given.astype(str) != ""), source_name(root)).astype(str))
    df["root_dir"] = str(root)  # where the files are, until import_rows has copied them
    df.attrs["labels"] = labels_path
    return df


def combine_sources(tables):
    """One table of several sources: an image id in two of them ends the run (most likely the same
    image twice, as with two copies of HAM10000), lesion ids are kept apart by their source's name."""
    if len(tables) == 1:
        return tables[0]
    seen_sources, seen_images = {}, {}
    for table in tables:
        for name in table["source"].unique():
            if name in seen_sources:
                fail(table.attrs["labels"], f"source {name} is also {seen_sources[name]}'s; give folders of "
                     "different names")
            seen_sources[name] = table["root_dir"].iloc[0]
        for image_id, name in zip(table["image_id"], table["source"]):
            if image_id in seen_images:
                fail(table.attrs["labels"], f"image_id {image_id} is in source {seen_images[image_id]} too: the same "
                     "image twice? Import one copy")
            seen_images[image_id] = name
    combined = pd.concat(tables, ignore_index=True)
    prefix = combined["source"] + ":"
    kept_apart = [lesion.startswith(p) for lesion, p in zip(combined["lesion_id"], prefix)]
    combined["lesion_id"] = combined["lesion_id"].where(kept_apart, prefix + combined["lesion_id"])
    return combined


def imported_mask(mask_path, shape, target):
    """Write a ground-truth mask, any size, as a 0/255 PNG of the image's shape."""
    import cv2
    mask = read_mask(mask_path).astype(np.float32)
    if mask.shape != shape:
        mask = cv2.resize(mask, shape[::-1], interpolation=cv2.INTER_AREA)
    write_png(target, (mask >= 0.5).astype(np.uint8) * 255)


def import_rows(df, out_dir, link=False):
    """Check, then copy (or hard-link, for our own downloads) each row's image into out_dir/images
    and its mask, resized to the image, into out_dir/masks. Unreadable images are reported and
    left out; an unreadable mask is reported and its image imported without one."""
    images, masks, problems = [], [], []
    has_masks = "mask" in df.columns
    for row in tqdm(df.itertuples(), total=len(df), desc="importing images"):
        root = Path(row.root_dir)
        source = root / row.filename
        try:
            if not source.is_file():
                fail(source, "file not found")
            shape = read_rgb(source).shape[:2]
        except ToolkitError as e:
            problems.append(str(e))
            images.append(None)
            masks.append(None)
            continue
        target = out_dir / "images" / f"{row.image_id}{source.suffix.lower()}"
        if not (target.is_file() and target.stat().st_size == source.stat().st_size):
            with atomic_path(target) as tmp:
                try:
                    if not link:
                        raise OSError
                    tmp.hardlink_to(source)  # no second copy of a multi-GB download
                except OSError:
                    shutil.copyfile(source, tmp)
        images.append(target.relative_to(out_dir).as_posix())
        mask_target = out_dir / "masks" / f"{row.image_id}.png"
        if has_masks and isinstance(row.mask, str) and row.mask:
            try:
                if not mask_target.is_file():  # written whole or not at all
                    imported_mask(root / row.mask, shape, mask_target)
                masks.append(mask_target.relative_to(out_dir).as_posix())
            except ToolkitError as e:
                print(f"imported {row.image_id} without its mask: {e}")
                masks.append(None)
        else:
            masks.append(None)
    for problem in problems:
        print(f"skipped {problem}")
    if problems:
        print(f"skipped {len(problems)} of {len(df)} images")
    df = df.assign(filename=images, **({"mask": masks} if has_masks else {})).drop(columns="root_dir")
    if df["filename"].isna().all():
        fail(out_dir, "none of the images could be read")
    return df[df["filename"].notna()].copy()


@one_line_errors
def main(args):
    if args.val_frac + args.test_frac >= 1:
        fail("--val-frac/--test-frac", "the fractions must leave lesions to train on")
    if args.only_split and args.from_dir is None:
        fail("--only-split", "chooses rows of a labels file: use it with --from-dir")
    if args.labels and args.from_dir and len(args.from_dir) > 1:
        fail("--labels", "names the labels file of one --from-dir folder; give each folder its own labels file")
    if args.collection and (args.source != "isic" or args.from_dir or args.synthetic is not None):
        fail("--collection", "chooses ISIC Archive collections: use it with --source isic")
    if args.collection and args.subset != "ham10000":
        fail("--subset", "chooses images of the HAM10000 collection; with --collection every image is kept")
    lock_output(args.out)
    if args.synthetic is not None:
        df = make_synthetic(args.synthetic, args.out, args.image_size, args.image_size * 3 // 4, args.seed)
    elif args.from_dir is not None:
        df = combine_sources([read_source(root, args.labels, args.limit) for root in args.from_dir])
        df = finish_metadata(df, args, assign=False)
        if args.only_split:  # chosen from labels alone: the other images are never opened
            df = df[df["split"].isin(args.only_split)]
            if df.empty:
                fail(args.from_dir[0], f"has no row in split {', '.join(args.only_split)}")
        df = import_rows(df, args.out)
    elif args.source == "isic":
        df = fetch_isic(args)
    else:
        df = fetch_dataverse(args)
    if args.subset == "isic2018_test" and args.from_dir is None and args.synthetic is None:
        args.assign_split = args.assign_split or "test"
    write_dataset(finish_metadata(df, args), args.out)


if __name__ == "__main__":
    main(parse_args())
