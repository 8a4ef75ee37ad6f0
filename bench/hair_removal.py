"""What hair removal repaints, on real images from three sources: the share of each image's pixels
that the hair mask sends to inpainting, inside the lesion and outside it, for the hair removal of
preprocess.py (--hair-removal on) beside the first study's (legacy).

Hairs do not care where the lesion is; pigment network, dots and globules lie inside it. A hair
mask that repaints more inside the lesion than outside is taking lesion structure for hair.

Datasets (from --shared): ham10000_224 (all 5,984; lesion masks: the expert masks of
ham10000_full, same image ids), PH2 (100; its expert masks), ISIC 2017 train and val (2,150; no
expert masks, so the classical segmentation of the original image; the test images are not read).
Images are scaled to the working size of preprocess.py first, as the pipeline does.

Writes into --out: hair_shares.csv (one row per image), hair_summary.csv and hair_summary.md (per
dataset: mean and median share, benign and malignant means, inside and outside the lesion), and
most_inpainted.png (the most-repainted images of each dataset, original beside cleaned).

Example: python bench/hair_removal.py --out bench/results/hair_removal
"""
import argparse
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import (atomic_path, hair_mask, legacy_hair_mask, lesion_mask, one_line_errors, read_mask,  # noqa: E402
                    read_rgb, remove_hair, save_image_grid, working_image, write_csv)

MODES = {"on": hair_mask, "legacy": legacy_hair_mask}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data", help="the shared data folder")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hair_removal")
    p.add_argument("--work-size", type=int, default=384, help="as preprocess.py --work-size")
    p.add_argument("--limit", type=int, help="images per dataset (a quick look)")
    p.add_argument("--sheet", type=int, default=4, help="most-inpainted images per dataset on the sheet")
    p.add_argument("--workers", type=int, default=2)
    return p.parse_args(argv)


def image_list(shared, limit):
    """(dataset, image_id, image path, malignant, expert mask path or None) for every image."""
    rows = []
    ham = pd.read_csv(shared / "ham10000_224" / "labels.csv")
    for r in ham.itertuples():
        mask = shared / "ham10000_full" / "masks" / f"{r.image_id}_segmentation.png"
        rows.append(("ham10000_224", r.image_id, shared / "ham10000_224" / r.filename, r.binary == "malignant",
                     mask if mask.is_file() else None))
    ph2 = pd.read_csv(shared / "ph2" / "labels.csv")
    rows += [("ph2", r.image_id, shared / "ph2" / r.filename, r.binary == "malignant", shared / "ph2" / r.mask)
             for r in ph2.itertuples()]
    isic = pd.read_csv(shared / "isic2017" / "labels.csv")
    isic = isic[isic["split"].isin(["train", "val"])]  # the test images stay unread
    rows += [("isic2017_trainval", r.image_id, shared / "isic2017" / r.filename, r.binary == "malignant", None)
             for r in isic.itertuples()]
    table = pd.DataFrame(rows, columns=["dataset", "image_id", "path", "malignant", "expert_mask"])
    return table.groupby("dataset", sort=False).head(limit) if limit else table


def lesion_of(rgb, expert_mask):
    """(lesion mask at the image's size, its source)."""
    import cv2
    if expert_mask is not None:
        mask = read_mask(expert_mask).astype(np.uint8)
        return cv2.resize(mask, rgb.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0, "expert"
    return lesion_mask(rgb)[0], "classical segmentation"


def shares(job):
    """One image's inpainted shares for each mode, in all, inside and outside the lesion."""
    import cv2
    cv2.setNumThreads(1)
    dataset, image_id, path, malignant, expert_mask, work_size = job
    rgb, _ = working_image(read_rgb(path), work_size)
    lesion, source = lesion_of(rgb, expert_mask)
    row = {"dataset": dataset, "image_id": image_id, "malignant": int(malignant), "lesion_mask": source}
    for mode, detect in MODES.items():
        hair = detect(rgb)
        suffix = "" if mode == "on" else f"_{mode}"
        row[f"share{suffix}"] = hair.mean()
        row[f"share_inside{suffix}"] = hair[lesion].mean() if lesion.any() else np.nan
        row[f"share_outside{suffix}"] = hair[~lesion].mean() if (~lesion).any() else np.nan
    return row


def summarise(table):
    rows = []
    for dataset, d in table.groupby("dataset", sort=False):
        row = {"dataset": dataset, "images": len(d), "lesion_mask": d["lesion_mask"].iloc[0]}
        for suffix in ("", "_legacy"):
            row.update({f"mean{suffix}": d[f"share{suffix}"].mean(), f"median{suffix}": d[f"share{suffix}"].median(),
                        f"benign_mean{suffix}": d.loc[d["malignant"] == 0, f"share{suffix}"].mean(),
                        f"malignant_mean{suffix}": d.loc[d["malignant"] == 1, f"share{suffix}"].mean(),
                        f"inside_mean{suffix}": d[f"share_inside{suffix}"].mean(),
                        f"outside_mean{suffix}": d[f"share_outside{suffix}"].mean()})
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(summary):
    lines = ["| images | hair removal | mean share inpainted | median | benign mean | malignant mean | "
             "inside lesion (mean) | outside lesion (mean) | lesion masks |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary.to_dict("records"):
        for suffix, name in (("_legacy", "legacy (first study)"), ("", "on (hair-shaped only)")):
            cells = [f"{100 * r[k + suffix]:.2f}%" for k in ("mean", "median", "benign_mean", "malignant_mean",
                                                             "inside_mean", "outside_mean")]
            lines.append(f"| {r['dataset']} ({r['images']}) | {name} | " + " | ".join(cells)
                         + f" | {r['lesion_mask']} |")
    return "\n".join(lines) + "\n"


def most_inpainted_sheet(table, n, work_size, path):
    tiles, titles = [], []
    for dataset, d in table.groupby("dataset", sort=False):
        for r in d.nlargest(n, "share").itertuples():
            rgb, _ = working_image(read_rgb(r.path), work_size)
            clean, hair = remove_hair(rgb, "on")
            tiles += [rgb, clean]
            titles += [f"{dataset} {r.image_id} ({'malignant' if r.malignant else 'benign'})",
                       f"cleaned: {hair.mean():.1%} inpainted (legacy {r.share_legacy:.1%})"]
    save_image_grid(tiles, titles, path, columns=4, tile_inches=(3.6, 3.0))


@one_line_errors
def main(args):
    images = image_list(args.shared, args.limit)
    jobs = [(*row, args.work_size) for row in images.itertuples(index=False)]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        rows = list(tqdm(pool.imap(shares, jobs, chunksize=16), total=len(jobs), desc="hair masks"))
    table = pd.DataFrame(rows)
    table["path"] = images["path"].to_numpy()
    write_csv(table.drop(columns="path"), args.out / "hair_shares.csv")
    summary = summarise(table)
    write_csv(summary, args.out / "hair_summary.csv")
    with atomic_path(args.out / "hair_summary.md") as tmp:
        tmp.write_text(markdown(summary))
    most_inpainted_sheet(table, args.sheet, args.work_size, args.out / "most_inpainted.png")
    print(markdown(summary))
    print(f"wrote {args.out}/hair_shares.csv, hair_summary.csv, hair_summary.md and most_inpainted.png")


if __name__ == "__main__":
    main(parse_args())
