"""Step 1: put a dataset in data/<dataset>/ with lesion-level train/val/test splits.

Writes data/<dataset>/images/* and data/<dataset>/metadata.csv with the columns
image_id, filename (relative to the dataset folder), lesion_id, dx, malignant (0/1), split,
plus whatever clinical columns the source had (age, sex, localization, dx_type...).
The split is grouped by lesion_id (a lesion never sits in two splits) and stratified by dx.

Sources:
  --synthetic N      N synthetic dermoscopy images with ground-truth masks (demo and tests)
  --from-dir PATH    a copy you already have: a labels CSV (labels.csv, metadata.csv or
                     HAM10000_metadata.csv, or --labels) with image_id and dx or label columns;
                     images at its filename column (relative to PATH) or anywhere below PATH
  --source isic|dataverse   the remote HAM10000 download (not built yet: use --from-dir)

Example: python fetch_data.py --from-dir ../shared/data/ham10000_224 --out data/ham224
"""
import argparse
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from common import (DX_CODES, METADATA_COLUMNS, SPLITS, atomic_path, fail, is_malignant, read_csv,
                    write_csv, write_png)

# How a labels column may spell a diagnosis, mapped to the HAM10000 code. PH2 has no dx codes:
# its nevi (common and atypical) are nv, its melanomas mel.
DX_ALIASES = {
    "melanocytic nevi": "nv", "nevus": "nv", "common_nevus": "nv", "atypical_nevus": "nv",
    "melanoma": "mel", "benign keratosis-like lesions": "bkl", "basal cell carcinoma": "bcc",
    "actinic keratoses": "akiec", "vascular lesions": "vasc", "dermatofibroma": "df",
}
LABEL_FILES = ("metadata.csv", "labels.csv", "HAM10000_metadata.csv", "HAM10000_metadata")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# Official HAM10000 class frequencies (10,015 images), so synthetic data has the real imbalance.
HAM10000_DX_COUNTS = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--synthetic", type=int, metavar="N", help="generate N synthetic images")
    source.add_argument("--from-dir", type=Path, metavar="PATH", help="import a local copy")
    source.add_argument("--source", choices=["isic", "dataverse"], help="download HAM10000")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to write, e.g. data/ham10000")
    p.add_argument("--labels", type=Path, help="labels CSV for --from-dir (default: found by name)")
    p.add_argument("--val-frac", type=float, default=0.15, help="fraction of lesions for validation")
    p.add_argument("--test-frac", type=float, default=0.15, help="fraction of lesions for test")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the synthetic images")
    p.add_argument("--image-size", type=int, default=160, help="side of synthetic images (4:3)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# lesion-level splits

SPLIT_FOLDS = 20  # fractions are realised in steps of 1/20 of the lesions


def lesion_splits(df, val_frac, test_frac, seed):
    """A split label per row, grouped by lesion_id and stratified by dx, using scikit-learn's
    StratifiedGroupKFold: the folds are dealt out to test, val, then train."""
    from sklearn.model_selection import StratifiedGroupKFold
    n_test, n_val = round(test_frac * SPLIT_FOLDS), round(val_frac * SPLIT_FOLDS)
    if n_test + n_val >= SPLIT_FOLDS:
        raise ValueError("val and test fractions leave nothing to train on")
    n_folds = min(SPLIT_FOLDS, df["lesion_id"].nunique())
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    split_of_fold = ["test"] * n_test + ["val"] * n_val + ["train"] * (SPLIT_FOLDS - n_test - n_val)
    split = np.empty(len(df), dtype=object)
    with warnings.catch_warnings():
        # Rare classes (df, vasc) having fewer lesions than folds is expected, not a problem.
        warnings.filterwarnings("ignore", message="The least populated class")
        for fold, (_, fold_rows) in enumerate(folds.split(df, df["dx"], groups=df["lesion_id"])):
            split[fold_rows] = split_of_fold[fold]
    return split


def finish_metadata(df, args):
    """Fill lesion ids, malignancy and splits, check the dx codes, and order the columns."""
    df = df.copy()
    # An image without a lesion id is a lesion of its own.
    df["lesion_id"] = df["lesion_id"].where(df["lesion_id"].notna() & (df["lesion_id"] != ""), df["image_id"])
    df["malignant"] = df["dx"].map(is_malignant)
    df["split"] = lesion_splits(df, args.val_frac, args.test_frac, args.seed)
    rest = [c for c in df.columns if c not in METADATA_COLUMNS]
    return df[list(METADATA_COLUMNS) + rest]


def write_dataset(df, out_dir):
    write_csv(df, out_dir / "metadata.csv")
    counts = df.groupby(["split", "dx"]).size().unstack(fill_value=0)
    print(f"wrote {out_dir / 'metadata.csv'}: {len(df)} images, {df['lesion_id'].nunique()} lesions")
    print(counts.reindex(index=list(SPLITS)).to_string())


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


def synthetic_image(rng, lesion, width, height):
    """One image of a lesion: (rgb uint8, ground-truth lesion mask bool, hair mask bool)."""
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

    hair = np.zeros(shape, np.uint8)
    for _ in range(rng.integers(0, 7)):
        points = np.cumsum(rng.normal(0, side / 8, (6, 2)), axis=0) + rng.uniform(0, side, 2)
        cv2.polylines(hair, [points.astype(np.int32)], False, 1, thickness=int(rng.integers(1, 3)))
    image[hair > 0] = (rng.uniform(20, 50, 3)).astype(np.uint8)

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
# local import


def find_labels_file(root):
    for name in LABEL_FILES:
        if (root / name).is_file():
            return root / name
    fail(root, f"no labels file found (looked for {', '.join(LABEL_FILES)}); pass --labels")


def normalise_dx(labels, path):
    """Map a labels column to HAM10000 dx codes, or end naming the values it cannot map."""
    text = labels.astype(str).str.strip()
    dx = text.str.lower().map(lambda v: v if v in DX_CODES else DX_ALIASES.get(v))
    unknown = sorted(text[dx.isna()].unique())
    if unknown:
        fail(path, f"unknown diagnosis value(s) {', '.join(unknown[:5])}; expected HAM10000 "
             f"codes ({', '.join(DX_CODES)}) or one of {', '.join(sorted(DX_ALIASES))}")
    return dx


def import_dir(root, labels_path, out_dir):
    """Copy images listed in a labels CSV into out_dir/images. Images the CSV names but that
    cannot be found or decoded are reported by name and left out."""
    import cv2
    if not root.is_dir():
        fail(root, "not a folder")
    labels_path = labels_path or find_labels_file(root)
    df = read_csv(labels_path, ["image_id"])
    label_column = next((c for c in ("dx", "label") if c in df.columns), None)
    if label_column is None:
        fail(labels_path, "needs a 'dx' or 'label' column with the diagnosis")
    df["dx"] = normalise_dx(df[label_column], labels_path)
    if "lesion_id" not in df.columns:
        df["lesion_id"] = np.nan
    if df["image_id"].duplicated().any():
        fail(labels_path, f"image_id {df['image_id'][df['image_id'].duplicated()].iloc[0]} appears twice")

    # Where no filename column is given (the official layout), images sit in any sub-folder.
    if "filename" in df.columns:
        sources = {row.image_id: root / row.filename for row in df.itertuples()}
    else:
        found = {p.stem: p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
        sources = {i: found.get(i, root / f"{i}.jpg") for i in df["image_id"]}

    kept, problems = {}, []
    for row in tqdm(df.itertuples(), total=len(df), desc="importing images"):
        source = sources[row.image_id]
        target = out_dir / "images" / f"{row.image_id}{source.suffix.lower()}"
        if not source.is_file():
            problems.append(f"{source}: file not found")
            continue
        if cv2.imread(str(source), cv2.IMREAD_REDUCED_GRAYSCALE_8) is None:
            problems.append(f"{source}: not a readable image")
            continue
        if not (target.is_file() and target.stat().st_size == source.stat().st_size):
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
        kept[row.image_id] = target.relative_to(out_dir).as_posix()
    for problem in problems:
        print(f"skipped {problem}")
    if problems:
        print(f"skipped {len(problems)} of {len(df)} images listed in {labels_path}")
    if not kept:
        fail(labels_path, "none of its images could be imported")
    imported = df[df["image_id"].isin(kept)].copy()
    imported["filename"] = imported["image_id"].map(kept)
    return imported.drop(columns=[c for c in ("label", "mask", "split", "binary") if c in imported.columns])


def main(args):
    if not 0 <= args.val_frac < 1 or not 0 < args.test_frac < 1:
        fail("--val-frac/--test-frac", "fractions must lie between 0 and 1")
    if args.source is not None:
        fail(f"--source {args.source}", "the remote HAM10000 download is not built yet; download the "
             "dataset yourself and import it with --from-dir PATH")
    if args.synthetic is not None:
        if args.synthetic < 20:
            fail("--synthetic", "needs at least 20 images to make three splits")
        df = make_synthetic(args.synthetic, args.out, args.image_size, args.image_size * 3 // 4, args.seed)
    else:
        df = import_dir(args.from_dir, args.labels, args.out)
    write_dataset(finish_metadata(df, args), args.out)


if __name__ == "__main__":
    main(parse_args())
