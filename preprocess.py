"""Step 2: hair removal, lesion segmentation and crop, cached for training and evaluation.

Reads data/<dataset>/metadata.csv and its images. Writes a cache folder (default
cache/<dataset>_<cache-size>) holding:
  masks/<image_id>.png   lesion masks at working resolution (open them to check the segmentation)
  images.npy             images after hair removal, N x S x S x 3 uint8 (S = --cache-size)
  crops.npy              square lesion crops with a margin, N x S x S x 3 uint8 (--crop-fit pad:
                         never cut by the image's edges, black beyond them)
  masks.npy              lesion masks at S x S, N x S x S uint8 (0/1), for masked input
  index.csv              image_id, lesion_id, dx, malignant, split, row (into the arrays),
                         mask_area, hair_fraction, mask_ok, mask_source (unet or classical),
                         crop_x0, crop_y0, crop_x1, crop_y1 (the crop box in the image's pixels)
  cache_key.json         every setting that changes the content; an unchanged key redoes nothing
Images that cannot be read are reported by name and left out of index.csv.

--colour-constancy shades_of_gray neutralises each image's colour cast (Shades of Gray, p = 6) in
the cached images and crops, the same in predict.py for a model trained on such a cache.

Segmentation (--segmenter) is the classical recipe (blue channel, Otsu, morphology), or the
U-Net of train_segmenter.py (--segmenter unet --segmenter-model FILE) with the classical recipe
where the learned mask is implausible; the cache key holds the checkpoint's SHA-256.

Hair removal (--hair-removal) inpaints only hair-shaped dark structures: long and thin, spanning
rather than folding into a mesh, so pigment network, dots, globules and streaks stay as they are.
hair_fraction in index.csv is the share of each image's pixels it repainted.

Where the dataset has ground-truth masks (metadata.csv's mask column, which fetch_data.py fills
from a source's masks), or --score-masks DIR names a folder of them (<image_id>.png or
<image_id>_*.png), the cached masks are scored against them: segmentation_scores.csv (image_id,
dx, split, source, dice, jaccard, area_ratio = our mask's area / the expert's, crop_coverage = the
share of the expert's lesion inside our lesion crop, mask_ok), segmentation_summary.json (mean
Dice, mean Jaccard, share of images with Jaccard < 0.65, median area ratio, mean crop coverage
and share of images whose crop holds >= 98% of the lesion; overall, per class, split and source)
and worst_overlays.png (the worst cases: ground truth green, ours red) go into the cache folder.
--overlay-sheet N draws N random images with their masks into overlays.png, for data without
ground truth.

Examples: python preprocess.py --data data/hamfull --cache-size 224
          python preprocess.py --data data/hamfull --segmenter unet --segmenter-model runs/segmenter/model.pt
          python preprocess.py --data data/ph2 --score-masks ../shared/data/ph2/masks
"""
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import (CACHE_ARRAYS, COLOUR_CONSTANCY, CROP_FITS, HAIR_REMOVAL_MODES, METADATA_COLUMNS, SEGMENTERS,
                    ArgumentParser, ToolkitError, check_names, fail, file_digest, load_segmenter, lock_output,
                    masks_by_image_id, number_in, one_line_errors, preprocess_image, preprocess_settings, read_csv,
                    read_json, read_mask, read_rgb, save_image_grid, size_named, write_csv, write_json, write_png)

# Bump when the segmentation or hair removal code changes what it writes.
PIPELINE_VERSION = 3


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--data", type=Path, required=True, help="dataset folder with metadata.csv")
    p.add_argument("--out", type=Path, help="cache folder (default cache/<dataset>_<cache-size>, with _hair-<mode> "
                                            "added for a --hair-removal other than on)")
    p.add_argument("--cache-size", "--img-size", type=number_in(int, 8), default=224,
                   help="side of the cached square images (a network reads them resized to its own size, train.py "
                        "--input-size)")
    p.add_argument("--work-size", type=number_in(int, 32), default=384,
                   help="longest side at which hair removal and segmentation run")
    p.add_argument("--crop-margin", type=number_in(float, 0, 2), default=0.15,
                   help="crop margin, fraction of the lesion box")
    p.add_argument("--crop-fit", choices=CROP_FITS, default="inside",
                   help="inside: the square crop stays inside the image (default); pad: it stays centred on the "
                        "lesion and holds all of it, black beyond the image's edges")
    p.add_argument("--hair-removal", choices=HAIR_REMOVAL_MODES, default="on",
                   help="on: inpaint hair-shaped structures only (default); legacy: every thin dark structure, "
                        "as the first study did (pigment network too); off: leave the images as they are")
    p.add_argument("--segmenter", choices=SEGMENTERS, default="classical",
                   help="classical: the morphology recipe (default); unet: the learned segmenter of "
                        "train_segmenter.py, with the classical recipe where its mask is implausible")
    p.add_argument("--segmenter-model", type=Path, default=Path("runs/segmenter/model.pt"),
                   help="the learned segmenter's checkpoint, for --segmenter unet")
    p.add_argument("--colour-constancy", choices=COLOUR_CONSTANCY, default="none",
                   help="shades_of_gray: neutralise each image's colour cast (Shades of Gray, p = 6) in the "
                        "cached images and crops")
    p.add_argument("--workers", type=number_in(int, 1), default=os.cpu_count(), help="processes (1: no pool)")
    p.add_argument("--score-masks", type=Path, metavar="DIR",
                   help="score the masks against ground truth in DIR (default: the dataset's mask column)")
    p.add_argument("--worst", type=number_in(int, 1), default=8, help="cases on the worst-overlay sheet")
    p.add_argument("--overlay-sheet", type=number_in(int, 1), metavar="N", help="draw N random images with their masks")
    return p.parse_args(argv)


def _worker(job):
    """Runs in a pool process: one image, errors returned as text rather than raised."""
    import cv2
    cv2.setNumThreads(1)  # the pool already uses every core
    image_id, path, settings = job
    if settings["segmenter"] is not None:
        import torch
        torch.set_num_threads(1)
    try:
        return image_id, preprocess_image(path, **settings), None
    except ToolkitError as e:  # read_rgb's one-line error
        return image_id, None, f"error: {e}"
    except Exception as e:  # report any per-image failure by name and go on
        return image_id, None, f"error: {path}: {type(e).__name__}: {e}"


def cache_key(args, metadata_path):
    key = {"pipeline_version": PIPELINE_VERSION, "cache_size": args.cache_size,
           "work_size": args.work_size, "crop_margin": args.crop_margin, "hair_removal": args.hair_removal,
           "segmenter": args.segmenter, "colour_constancy": args.colour_constancy,
           "metadata_sha256": file_digest(metadata_path)}
    if args.crop_fit != "inside":  # a key without it means inside: the caches built before it stay valid
        key["crop_fit"] = args.crop_fit
    if args.segmenter == "unet":
        load_segmenter(args.segmenter_model)  # a missing or foreign file ends here, before any work
        key.update(segmenter_model=str(args.segmenter_model), segmenter_sha256=file_digest(args.segmenter_model))
    return key


def read_cache_key(path):
    """A cache's cache_key.json, its size under today's name (cache_size; "img_size" before), so that a
    cache built before the rename is no stale one."""
    key = read_json(path)
    return size_named(key, "cache_size") if isinstance(key, dict) else key


def allocated_array(path, shape):
    """A uint8 array file mapped into memory, its disk space reserved first: on a full disk that
    ends here with one line, where a sparse file would kill the process (SIGBUS) mid-way."""
    try:
        array = np.lib.format.open_memmap(path, "w+", np.uint8, shape)
        if hasattr(os, "posix_fallocate"):
            with open(path, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    except OSError as e:
        fail(path, f"could not be written ({e.strerror or e})")
    return array


def preprocess_all(metadata, data_dir, out_dir, key, args):
    """Preprocess every image into the arrays and mask PNGs of out_dir (a fresh folder).
    Returns (index rows of the images done, error lines of those that failed)."""
    n, s = len(metadata), args.cache_size
    settings = preprocess_settings(key)
    jobs = [(row.image_id, data_dir / row.filename, settings) for row in metadata.itertuples()]
    # Arrays are written in place as results arrive, so memory stays flat for large datasets.
    images, crops, masks = (allocated_array(out_dir / name, shape) for name, shape in
                            (("images.npy", (n, s, s, 3)), ("crops.npy", (n, s, s, 3)), ("masks.npy", (n, s, s))))
    rows, failures = [], []
    # spawn, not fork: a forked child of a process that has started OpenMP or torch threads
    # can deadlock. One worker runs in this process. The executor, unlike multiprocessing.Pool,
    # notices a worker that dies (killed, out of memory) instead of waiting for it forever.
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) \
            if args.workers > 1 else nullcontext() as pool:
        results = pool.map(_worker, jobs, chunksize=8) if pool else map(_worker, jobs)
        try:
            with tqdm(results, total=n, desc="preprocessing") as bar:  # its line ends before an error's
                for i, (image_id, out, error) in enumerate(bar):
                    if error:
                        failures.append(error)
                        continue
                    images[i], crops[i], masks[i] = out.pop("image"), out.pop("crop"), out.pop("mask_small")
                    write_png(out_dir / "masks" / f"{image_id}.png", out.pop("mask"))
                    rows.append({"position": i, **out})
        except BrokenProcessPool:
            fail(args.data / "metadata.csv", "a preprocessing worker died (killed or out of memory); nothing was "
                 "written, run again (with fewer --workers if memory is short)")
    images.flush(), crops.flush(), masks.flush()
    for error in failures:
        print(error)
    return rows, failures


def write_cache(metadata, metadata_path, out_dir, key, args):
    """Build the cache beside out_dir and swap it in whole: a crash never leaves a half cache."""
    import pandas as pd

    build_dir = out_dir.with_name(f".building.{out_dir.name}")
    shutil.rmtree(build_dir, ignore_errors=True)
    (build_dir / "masks").mkdir(parents=True)
    try:
        rows, failures = preprocess_all(metadata, args.data, build_dir, key, args)
    except BaseException:  # a full disk, a dead worker, Ctrl+C: leave nothing half-built behind
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    if not rows:
        shutil.rmtree(build_dir)
        fail(metadata_path, "no image could be preprocessed")
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


# ---------------------------------------------------------------------------------------------
# segmentation scores and overlay sheets


def dice_jaccard(predicted, truth):
    intersection = np.logical_and(predicted, truth).sum()
    total = predicted.sum() + truth.sum()
    union = total - intersection
    return (2 * intersection / total if total else 1.0), (intersection / union if union else 1.0)


def crop_coverage(row, truth):
    """The share of the expert's lesion pixels inside the cached crop box (index.csv's crop_x0..y1,
    in the image's pixels): what the classifier's crop input sees of the lesion."""
    if not truth.any():
        return np.nan
    h, w = truth.shape
    # the box is in the image's pixels, a truth mask may be of another size
    width, height = (getattr(row, k, np.nan) for k in ("width", "height"))
    width, height = (width, height) if np.isfinite(width) and np.isfinite(height) else (w, h)
    # a padded crop's box reaches beyond the image: count what lies inside it
    x0, x1 = max(round(row.crop_x0 * w / width), 0), round(row.crop_x1 * w / width)
    y0, y1 = max(round(row.crop_y0 * h / height), 0), round(row.crop_y1 * h / height)
    return truth[y0:y1, x0:x1].sum() / truth.sum()


def truth_masks(args, metadata):
    """Ground-truth mask path per image id: from --score-masks DIR, else the dataset's own mask
    column (fetch_data.py imports them); empty where there are none."""
    if args.score_masks:
        if not args.score_masks.is_dir():
            fail(args.score_masks, "not a folder")
        found = masks_by_image_id(args.score_masks, metadata["image_id"])
        if not found:
            fail(args.score_masks, "holds no mask named after an image id of this dataset")
        return {image_id: args.score_masks / path for image_id, path in found.items()}
    if "mask" not in metadata.columns:
        return {}
    given = metadata[metadata["mask"].notna()]
    return {row.image_id: args.data / row.mask for row in given.itertuples()}


def outlined(rgb, masks_and_colours, side=300):
    """The image scaled to `side` wide with each mask's outer contour drawn in its colour."""
    import cv2
    h, w = rgb.shape[:2]
    size = (side, round(side * h / w))
    tile = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    for mask, colour in masks_and_colours:
        small = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(tile, contours, -1, colour, 2)
    return tile


CROP_HOLDS = 0.98  # a crop holds the lesion when this share of its pixels is inside


def segmentation_summary(scores):
    summary = {"images": len(scores), "mean_dice": scores["dice"].mean(), "mean_jaccard": scores["jaccard"].mean(),
               "share_jaccard_below_0.65": (scores["jaccard"] < 0.65).mean(),
               "flagged_mask_ok_0": int((scores["mask_ok"] == 0).sum())}
    if "crop_coverage" in scores.columns:  # caches scored before these columns have only the above
        summary.update({"median_area_ratio": scores["area_ratio"].median(),
                        "mean_crop_coverage": scores["crop_coverage"].mean(),
                        f"share_crop_holds_{CROP_HOLDS:.0%}": (scores["crop_coverage"] >= CROP_HOLDS).mean()})
    return summary


def score_masks(index, data_dir, cache_dir, truth_paths, worst, truth_name):
    """Dice, Jaccard, area ratio and crop coverage of every cached mask against its ground truth,
    at the truth's size, overall, per class, split and source; the worst cases on a sheet."""
    import cv2
    import pandas as pd
    rows = []
    scored = index[index["image_id"].isin(truth_paths)]
    unreadable = 0
    for row in tqdm(scored.itertuples(), total=len(scored), desc="scoring masks"):
        try:
            truth = read_mask(truth_paths[row.image_id])
        except ToolkitError as e:  # a mask gone or damaged costs that image its score, not the run
            tqdm.write(f"no mask score for {row.image_id}: {e}")
            unreadable += 1
            continue
        ours = read_mask(cache_dir / "masks" / f"{row.image_id}.png").astype(np.uint8)
        ours = cv2.resize(ours, truth.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
        dice, jaccard = dice_jaccard(ours, truth)
        rows.append({"image_id": row.image_id, "dx": row.dx, "split": row.split,
                     "source": row.source if isinstance(getattr(row, "source", None), str) else "",
                     "dice": dice, "jaccard": jaccard,
                     "area_ratio": ours.sum() / truth.sum() if truth.any() else np.nan,
                     "crop_coverage": crop_coverage(row, truth), "mask_ok": row.mask_ok})
    if not rows:
        print(f"no mask of {truth_name} could be read: no mask scores written")
        return None
    scores = pd.DataFrame(rows)
    summary = {**segmentation_summary(scores), "truth": truth_name, "unreadable_masks": unreadable,
               "by_dx": {dx: segmentation_summary(group) for dx, group in scores.groupby("dx")},
               "by_split": {split: segmentation_summary(group) for split, group in scores.groupby("split")},
               "by_source": {source: segmentation_summary(group) for source, group in scores.groupby("source")
                             if source}}
    write_csv(scores, cache_dir / "segmentation_scores.csv")
    write_json(summary, cache_dir / "segmentation_summary.json")

    worst_rows = scores.nsmallest(worst, "dice")
    filenames = index.set_index("image_id")["filename"]
    tiles, titles = [], []
    for r in worst_rows.itertuples():
        truth = read_mask(truth_paths[r.image_id])
        ours = read_mask(cache_dir / "masks" / f"{r.image_id}.png")
        rgb = read_rgb(data_dir / filenames[r.image_id])
        ours = cv2.resize(ours.astype(np.uint8), truth.shape[::-1], interpolation=cv2.INTER_NEAREST)
        tiles.append(outlined(rgb, [(truth, (0, 255, 0)), (ours, (255, 0, 0))]))
        titles.append(f"{r.image_id} {r.dx}  Dice {r.dice:.2f}  Jaccard {r.jaccard:.2f}")
    save_image_grid(tiles, titles, cache_dir / "worst_overlays.png", columns=4)
    print(f"{summary['images']} masks against {truth_name}: mean Dice {summary['mean_dice']:.3f}, mean Jaccard "
          f"{summary['mean_jaccard']:.3f}, Jaccard < 0.65 for {summary['share_jaccard_below_0.65']:.1%}"
          + (f" ({unreadable} masks unreadable, not scored)" if unreadable else "") + "; "
          f"wrote {cache_dir / 'segmentation_summary.json'} and {cache_dir / 'worst_overlays.png'}")
    return summary


def overlay_sheet(index, data_dir, cache_dir, n, seed=0):
    import cv2
    chosen = index.sample(min(n, len(index)), random_state=seed)
    tiles, titles = [], []
    for r in chosen.itertuples():
        ours = read_mask(cache_dir / "masks" / f"{r.image_id}.png")
        rgb = read_rgb(data_dir / r.filename)
        ours = cv2.resize(ours.astype(np.uint8), rgb.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        tiles.append(outlined(rgb, [(ours, (255, 0, 0) if r.mask_ok else (255, 255, 0))]))
        titles.append(f"{r.image_id} {r.dx}" + ("" if r.mask_ok else " (no plausible mask)"))
    save_image_grid(tiles, titles, cache_dir / "overlays.png", columns=10 if n >= 30 else 5)
    print(f"wrote {cache_dir / 'overlays.png'}")


def default_cache_dir(args):
    """cache/<dataset>_<cache size>, with a suffix for each setting other than the default's. The
    Makefile names its caches by the same rule (CACHE_SUFFIX): it must know them when it reads its
    targets, before any Python runs; tests/test_pipeline.py holds the two equal."""
    suffix = ("" if args.hair_removal == "on" else f"_hair-{args.hair_removal}") + \
        ("_unet" if args.segmenter == "unet" else "") + \
        ("_sog" if args.colour_constancy == "shades_of_gray" else "") + ("_pad" if args.crop_fit == "pad" else "")
    return Path("cache") / f"{args.data.name}_{args.cache_size}{suffix}"


@one_line_errors
def main(args):
    metadata_path = args.data / "metadata.csv"
    metadata = read_csv(metadata_path, METADATA_COLUMNS)
    check_names(metadata, metadata_path)  # image ids name the mask files; filenames are read
    out_dir = args.out or default_cache_dir(args)
    key = cache_key(args, metadata_path)
    lock_output(out_dir)
    complete = all((out_dir / name).is_file() for name in ("index.csv", "cache_key.json", *CACHE_ARRAYS.values()))
    rebuilt = not (complete and read_cache_key(out_dir / "cache_key.json") == key)
    if rebuilt:
        write_cache(metadata, metadata_path, out_dir, key, args)
    else:
        print(f"{out_dir} is up to date")
    truth = truth_masks(args, metadata)
    # the dataset's own masks are scored once per cache; --score-masks DIR every time it is given
    if truth and (args.score_masks or rebuilt or not (out_dir / "segmentation_summary.json").is_file()):
        index = read_csv(out_dir / "index.csv", ("image_id", "filename", "dx", "split", "mask_ok", "crop_x0", "crop_y0",
                                                 "crop_x1", "crop_y1"))
        score_masks(index, args.data, out_dir, truth, args.worst,
                    str(args.score_masks) if args.score_masks else f"the mask column of {metadata_path}")
    if args.overlay_sheet:
        index = read_csv(out_dir / "index.csv", ("image_id", "filename", "mask_ok"))
        overlay_sheet(index, args.data, out_dir, args.overlay_sheet)


if __name__ == "__main__":
    main(parse_args())
