"""Segmenters side by side on images with expert masks: the classical recipe and learned U-Nets.

Reads preprocess caches of one dataset, one per segmenter (--cache NAME=CACHE, two or more; each
holds segmentation_scores.csv: preprocess.py scores its masks against the dataset's ground truth),
keeps the rows of --split (and --source), and writes into --out:
  <name>_summary.csv   per segmenter, and per segmenter and source where the rows hold several:
                       images, mean Dice, mean Jaccard, share with Jaccard < 0.65, median area ratio
                       (ours / the expert's), mean crop coverage and share of images whose crop holds
                       >= 98% of the lesion, mask_ok=0 count, masks from the classical fallback,
                       per-class Dice
  <name>_worst.png     each segmenter's worst cases, every segmenter side by side on each (ground
                       truth green, the segmenter's mask in its colour)
with --crops N, <name>_crops.png: the N images whose crops hold the most different shares of the
expert's lesion across the caches, each cache's crop (crops.npy, what the classifier sees) side by
side, and
with --model, the network's own speed on 160x128 inputs (<name>_speed.json): one image at a
time on one thread (a preprocess.py worker) and batches of 32 on all threads.

Example: python bench/segmenter.py --data data/hamfull --split test --cache classical=cache/hamfull_224 \
             --cache unet=cache/hamfull_224_unet --name hamfull_test --model runs/segmenter/model.pt
"""
import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import (DX_CODES, SEGMENTER_SIZE, atomic_path, fail, load_cache, load_segmenter,  # noqa: E402
                    one_line_errors, read_csv, read_mask, read_rgb, save_image_grid, segmenter_logits, write_csv)
from preprocess import outlined, segmentation_summary  # noqa: E402

GREEN = (0, 255, 0)
COLOURS = [(255, 0, 0), (0, 96, 255), (255, 0, 255), (255, 160, 0)]  # the segmenters' in --cache order


def named_cache(text):
    name, _, path = text.partition("=")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"'{text}' is not NAME=CACHE")
    return name, Path(path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the dataset folder both caches were built from")
    p.add_argument("--cache", type=named_cache, action="append", required=True, metavar="NAME=CACHE",
                   help="a segmenter's name and the cache preprocess.py built with it (two or more)")
    p.add_argument("--split", default="all", choices=["train", "val", "test", "all"])
    p.add_argument("--source", help="keep only the rows of this source (index.csv's source column)")
    p.add_argument("--name", required=True, help="prefix of the output files")
    p.add_argument("--worst", type=int, default=6, help="cases per segmenter on the sheet")
    p.add_argument("--crops", type=int, default=0, metavar="N",
                   help="draw every cache's crop of the N images where the caches' crop coverages differ most")
    p.add_argument("--model", type=Path, help="segmenter checkpoint to time")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "segmenter")
    return p.parse_args(argv)


def scores_of(cache, split, source):
    scores = read_csv(cache / "segmentation_scores.csv", ("image_id", "dx", "split", "dice", "jaccard", "mask_ok",
                                                          "area_ratio", "crop_coverage"))
    scores["source"] = scores["source"].fillna("") if "source" in scores.columns else ""
    index = read_csv(cache / "index.csv", ("image_id", "filename"))
    if "mask_source" in index.columns:
        scores = scores.merge(index[["image_id", "mask_source"]], on="image_id")
    if split != "all":
        scores = scores[scores["split"] == split]
    return scores if source is None else scores[scores["source"] == source]


def summary_row(name, scores, source="all"):
    learned = "mask_source" in scores.columns and (scores["mask_source"] == "unet").any()
    row = {"segmenter": name, "source": source, **segmentation_summary(scores),
           "classical_fallback": int((scores["mask_source"] == "classical").sum()) if learned else np.nan}
    for dx in DX_CODES:
        mine = scores[scores["dx"] == dx]
        row[f"dice_{dx}"] = mine["dice"].mean() if len(mine) else np.nan
    return row


def worst_sheet(data, caches, dice, worst, path):
    """A row per case, each segmenter's `worst` lowest Dice in turn: the case under every segmenter."""
    metadata = read_csv(data / "metadata.csv", ("image_id", "filename", "mask", "dx")).set_index("image_id")
    chosen = list(dict.fromkeys(i for name in caches for i in dice[name].nsmallest(worst).index))
    tiles, titles = [], []
    for image_id in chosen:
        rgb = read_rgb(data / metadata.loc[image_id, "filename"])
        truth = read_mask(data / metadata.loc[image_id, "mask"])
        for (name, cache), colour in zip(caches.items(), COLOURS):
            ours = read_mask(cache / "masks" / f"{image_id}.png").astype(np.uint8)
            ours = cv2.resize(ours, truth.shape[::-1], interpolation=cv2.INTER_NEAREST)
            tiles.append(outlined(rgb, [(truth, GREEN), (ours, colour)]))
            titles.append(f"{image_id} {metadata.loc[image_id, 'dx']} {name}: Dice {dice.loc[image_id, name]:.2f}")
    save_image_grid(tiles, titles, path, columns=len(caches) * (2 if len(caches) == 2 else 1))


def crop_sheet(caches, coverage, n, path):
    """A row per image, the n whose crop coverage differs most between caches: each cache's crop."""
    chosen = (coverage.max(axis=1) - coverage.min(axis=1)).nlargest(n).index
    crops = {}
    for name, cache in caches.items():
        index, arrays = load_cache(cache)
        crops[name] = (index.set_index("image_id")["row"], arrays["crop"])
    tiles, titles = [], []
    for image_id in chosen:
        for name, (rows, crop) in crops.items():
            tiles.append(np.asarray(crop[rows[image_id]]))
            titles.append(f"{image_id} {name}: {coverage.loc[image_id, name]:.0%} of the lesion")
    save_image_grid(tiles, titles, path, columns=len(caches), tile_inches=(2.6, 2.8))


def network_speed(model_path, repeats=30):
    import torch
    model, checkpoint = load_segmenter(model_path)
    width, height = SEGMENTER_SIZE
    one = np.zeros((1, height, width, 3), np.uint8)
    batch = np.zeros((32, height, width, 3), np.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    segmenter_logits(model, one, checkpoint["normalisation"])
    started = time.perf_counter()
    for _ in range(repeats):
        segmenter_logits(model, one, checkpoint["normalisation"])
    single = repeats / (time.perf_counter() - started)
    torch.set_num_threads(threads)
    segmenter_logits(model, batch, checkpoint["normalisation"])
    started = time.perf_counter()
    for _ in range(max(1, repeats // 10)):
        segmenter_logits(model, batch, checkpoint["normalisation"])
    batched = 32 * max(1, repeats // 10) / (time.perf_counter() - started)
    return {"images_per_s_one_thread_batch_1": single, f"images_per_s_{threads}_threads_batch_32": batched,
            "input": f"{width}x{height}"}


@one_line_errors
def main(args):
    caches = dict(args.cache)
    if len(caches) < 2:
        raise SystemExit("error: --cache: name two or more segmenters' caches to set side by side")
    scores = {name: scores_of(cache, args.split, args.source) for name, cache in caches.items()}
    shared = set.intersection(*(set(s["image_id"]) for s in scores.values()))
    if not shared:
        fail(", ".join(map(str, caches.values())), f"share no scored image in split {args.split}")
    scores = {name: s[s["image_id"].isin(shared)] for name, s in scores.items()}  # the same images for each
    rows = []
    for name, s in scores.items():
        rows.append(summary_row(name, s))
        if s["source"].nunique() > 1:
            rows += [summary_row(name, group, source) for source, group in s.groupby("source")]
    summary = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(summary, args.out / f"{args.name}_summary.csv")
    dice = pd.DataFrame({name: s.set_index("image_id")["dice"] for name, s in scores.items()})
    worst_sheet(args.data, caches, dice, args.worst, args.out / f"{args.name}_worst.png")
    if args.crops:
        coverage = pd.DataFrame({name: s.set_index("image_id")["crop_coverage"] for name, s in scores.items()})
        crop_sheet(caches, coverage, args.crops, args.out / f"{args.name}_crops.png")
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 200):
        print(summary.to_string(index=False))
    if args.model:
        speed = network_speed(args.model)
        with atomic_path(args.out / f"{args.name}_speed.json") as tmp:
            tmp.write_text(json.dumps(speed, indent=2) + "\n")
        print(speed)


if __name__ == "__main__":
    main(parse_args())
