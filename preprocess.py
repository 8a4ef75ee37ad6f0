"""Step 2: hair removal, lesion segmentation and crop, cached for training and evaluation.

Reads data/<dataset>/metadata.csv and its images. Writes a cache folder (default
cache/<dataset>_<img-size>) holding:
  masks/<image_id>.png   lesion masks at working resolution (open them to check the segmentation)
  images.npy             hair-removed images, N x S x S x 3 uint8 (S = --img-size)
  crops.npy              square lesion crops with a margin, N x S x S x 3 uint8
  masks.npy              lesion masks at S x S, N x S x S uint8 (0/1), for masked input
  index.csv              image_id, lesion_id, dx, malignant, split, row (into the arrays),
                         mask_area, hair_fraction, mask_ok, crop_x0, crop_y0, crop_x1, crop_y1
  cache_key.json         every setting that changes the content; an unchanged key redoes nothing
Images that cannot be read are reported by name and left out of index.csv.

Example: python preprocess.py --data data/ham224 --img-size 224
"""
import argparse
import multiprocessing
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import (METADATA_COLUMNS, crop_box, file_sha256, lesion_mask, read_csv,
                    read_json, read_rgb, remove_hair, resize_to, write_csv, write_json, write_png)

# Bump when the segmentation or hair removal code changes what it writes.
PIPELINE_VERSION = 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="dataset folder with metadata.csv")
    p.add_argument("--out", type=Path, help="cache folder (default cache/<dataset>_<img-size>)")
    p.add_argument("--img-size", type=int, default=224, help="side of the cached square images")
    p.add_argument("--work-size", type=int, default=384,
                   help="longest side at which hair removal and segmentation run")
    p.add_argument("--crop-margin", type=float, default=0.15, help="crop margin, fraction of the lesion box")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (1: no pool)")
    return p.parse_args(argv)


def preprocess_image(path, img_size, work_size, crop_margin):
    """Everything done to one image: returns the cached arrays and the index values."""
    import cv2
    rgb = read_rgb(path)
    h, w = rgb.shape[:2]
    scale = min(1.0, work_size / max(h, w))
    if scale < 1:
        rgb = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    clean, hair = remove_hair(rgb)
    mask, plausible = lesion_mask(clean)
    x0, y0, x1, y1 = crop_box(mask, crop_margin)
    return {
        "image": resize_to(clean, img_size),
        "crop": resize_to(clean[y0:y1, x0:x1], img_size),
        "mask_small": (resize_to(mask.astype(np.uint8), img_size) > 0).astype(np.uint8),
        "mask": mask.astype(np.uint8) * 255,
        "mask_area": float(mask.mean()), "hair_fraction": float(hair.mean()),
        "mask_ok": int(plausible),
        # the box in the original image's pixels, for users who crop the full-size image
        "crop_x0": round(x0 / scale), "crop_y0": round(y0 / scale),
        "crop_x1": round(x1 / scale), "crop_y1": round(y1 / scale),
    }


def _worker(job):
    """Runs in a pool process: one image, errors returned as text rather than raised."""
    import cv2
    cv2.setNumThreads(1)  # the pool already uses every core
    image_id, path, settings = job
    try:
        return image_id, preprocess_image(path, **settings), None
    except SystemExit as e:  # read_rgb's one-line error
        return image_id, None, str(e)
    except Exception as e:  # report any per-image failure by name and go on
        return image_id, None, f"error: {path}: {type(e).__name__}: {e}"


def cache_key(args, metadata_path):
    return {"pipeline_version": PIPELINE_VERSION, "img_size": args.img_size,
            "work_size": args.work_size, "crop_margin": args.crop_margin,
            "metadata_sha256": file_sha256(metadata_path)}


def build_cache(metadata, data_dir, out_dir, args):
    """Write the cache into out_dir (a fresh folder). Returns the number of failed images."""
    n, s = len(metadata), args.img_size
    settings = {"img_size": s, "work_size": args.work_size, "crop_margin": args.crop_margin}
    jobs = [(row.image_id, data_dir / row.filename, settings) for row in metadata.itertuples()]
    # Arrays are written in place as results arrive, so memory stays flat for large datasets.
    images = np.lib.format.open_memmap(out_dir / "images.npy", "w+", np.uint8, (n, s, s, 3))
    crops = np.lib.format.open_memmap(out_dir / "crops.npy", "w+", np.uint8, (n, s, s, 3))
    masks = np.lib.format.open_memmap(out_dir / "masks.npy", "w+", np.uint8, (n, s, s))
    rows, failures = [], []
    # spawn, not fork: a forked child of a process that has started OpenMP or torch threads
    # can deadlock. One worker runs in this process.
    with multiprocessing.get_context("spawn").Pool(args.workers) if args.workers > 1 else nullcontext() as pool:
        results = pool.imap(_worker, jobs, chunksize=8) if pool else map(_worker, jobs)
        for i, (image_id, out, error) in enumerate(tqdm(results, total=n, desc="preprocessing")):
            if error:
                failures.append(error)
                continue
            images[i], crops[i], masks[i] = out.pop("image"), out.pop("crop"), out.pop("mask_small")
            write_png(out_dir / "masks" / f"{image_id}.png", out.pop("mask"))
            rows.append({"position": i, **out})
    images.flush(), crops.flush(), masks.flush()
    for error in failures:
        print(error)
    return rows, failures


def main(args):
    import pandas as pd
    metadata_path = args.data / "metadata.csv"
    metadata = read_csv(metadata_path, METADATA_COLUMNS)
    out_dir = args.out or Path("cache") / f"{args.data.name}_{args.img_size}"
    key = cache_key(args, metadata_path)
    if (out_dir / "cache_key.json").is_file() and read_json(out_dir / "cache_key.json") == key:
        print(f"{out_dir} is up to date")
        return

    # Build beside the target and swap it in whole: a crash never leaves a half cache.
    build_dir = out_dir.with_name(f".building.{out_dir.name}")
    shutil.rmtree(build_dir, ignore_errors=True)
    (build_dir / "masks").mkdir(parents=True)
    rows, failures = build_cache(metadata, args.data, build_dir, args)
    if not rows:
        shutil.rmtree(build_dir)
        raise SystemExit(f"error: {metadata_path}: no image could be preprocessed")
    per_image = pd.DataFrame(rows)
    index = metadata.iloc[per_image["position"]].reset_index(drop=True)
    # Rows of failed images stay in the arrays (zeros) but not in the index.
    index.insert(len(METADATA_COLUMNS), "row", per_image["position"].to_numpy())
    index = pd.concat([index, per_image.drop(columns="position")], axis=1)
    write_csv(index, build_dir / "index.csv")
    write_json(key, build_dir / "cache_key.json")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(build_dir, out_dir)
    flagged = int((index["mask_ok"] == 0).sum())
    print(f"wrote {out_dir}: {len(index)} images ({len(failures)} failed), "
          f"{flagged} without a plausible mask (whole image used, mask_ok=0)")


if __name__ == "__main__":
    main(parse_args())
