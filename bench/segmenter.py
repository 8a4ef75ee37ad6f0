"""The learned segmenter beside the classical recipe, on images with expert masks.

Reads two preprocess caches of one dataset, one built with --segmenter classical and one with
--segmenter unet (each holds segmentation_scores.csv: preprocess.py scores its masks against the
dataset's ground truth), keeps the rows of --split, and writes into --out:
  <name>_summary.csv   per segmenter: images, mean Dice, mean Jaccard, share with Jaccard < 0.65,
                       mask_ok=0 count (preprocess.py's summary), the learned masks replaced by the
                       classical ones, per-class Dice
  <name>_worst.png     each segmenter's worst cases, the two segmenters side by side on each
                       (ground truth green, classical red, U-Net blue)
and with --model, the network's own speed on 160x128 inputs (<name>_speed.json): one image at a
time on one thread (a preprocess.py worker) and batches of 32 on all threads.

Example: python bench/segmenter.py --data data/hamfull --split test --classical cache/hamfull_224 \
             --unet cache/hamfull_224_unet --name hamfull_test --model runs/segmenter/model.pt
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
from common import (DX_CODES, SEGMENTER_SIZE, atomic_path, load_segmenter, read_csv, read_mask,  # noqa: E402
                    read_rgb, save_image_grid, segmenter_logits, write_csv)
from preprocess import outlined, segmentation_summary  # noqa: E402

GREEN, RED, BLUE = (0, 255, 0), (255, 0, 0), (0, 96, 255)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the dataset folder both caches were built from")
    p.add_argument("--classical", type=Path, required=True, help="cache built with --segmenter classical")
    p.add_argument("--unet", type=Path, required=True, help="cache built with --segmenter unet")
    p.add_argument("--split", default="all", choices=["train", "val", "test", "all"])
    p.add_argument("--name", required=True, help="prefix of the output files")
    p.add_argument("--worst", type=int, default=6, help="cases per segmenter on the sheet")
    p.add_argument("--model", type=Path, help="segmenter checkpoint to time")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "segmenter")
    return p.parse_args(argv)


def scores_of(cache, split):
    scores = read_csv(cache / "segmentation_scores.csv", ("image_id", "dx", "split", "dice", "jaccard", "mask_ok"))
    index = read_csv(cache / "index.csv", ("image_id", "filename"))
    if "mask_source" in index.columns:
        scores = scores.merge(index[["image_id", "mask_source"]], on="image_id")
    return scores if split == "all" else scores[scores["split"] == split]


def summary_row(name, scores):
    row = {"segmenter": name, **segmentation_summary(scores),
           "classical_fallback": int((scores["mask_source"] == "classical").sum()) if name == "unet" else np.nan}
    for dx in DX_CODES:
        mine = scores[scores["dx"] == dx]
        row[f"dice_{dx}"] = mine["dice"].mean() if len(mine) else np.nan
    return row


def worst_sheet(data, caches, both, worst, path):
    """Rows of two tiles: the case under the classical recipe (red), then under the U-Net (blue)."""
    filenames = read_csv(data / "metadata.csv", ("image_id", "filename", "mask")).set_index("image_id")
    chosen = pd.concat([both.nsmallest(worst, "dice_classical"), both.nsmallest(worst, "dice_unet")])
    tiles, titles = [], []
    for case in chosen.itertuples():
        rgb = read_rgb(data / filenames.loc[case.image_id, "filename"])
        truth = read_mask(data / filenames.loc[case.image_id, "mask"])
        for name, colour in (("classical", RED), ("unet", BLUE)):
            ours = read_mask(caches[name] / "masks" / f"{case.image_id}.png").astype(np.uint8)
            ours = cv2.resize(ours, truth.shape[::-1], interpolation=cv2.INTER_NEAREST)
            tiles.append(outlined(rgb, [(truth, GREEN), (ours, colour)]))
            titles.append(f"{case.image_id} {case.dx} {name}: Dice {getattr(case, 'dice_' + name):.2f}")
    save_image_grid(tiles, titles, path, columns=4)


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


def main(args):
    caches = {"classical": args.classical, "unet": args.unet}
    scores = {name: scores_of(cache, args.split) for name, cache in caches.items()}
    both = scores["classical"].merge(scores["unet"][["image_id", "dice", "jaccard"]], on="image_id",
                                     suffixes=("_classical", "_unet"))
    if both.empty:
        raise SystemExit(f"error: {args.classical} and {args.unet} share no scored image in split {args.split}")
    summary = pd.DataFrame([summary_row(name, scores[name][scores[name]["image_id"].isin(both["image_id"])])
                            for name in caches])
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(summary, args.out / f"{args.name}_summary.csv")
    worst_sheet(args.data, caches, both, args.worst, args.out / f"{args.name}_worst.png")
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 200):
        print(summary.to_string(index=False))
    if args.model:
        speed = network_speed(args.model)
        with atomic_path(args.out / f"{args.name}_speed.json") as tmp:
            tmp.write_text(json.dumps(speed, indent=2) + "\n")
        print(speed)


if __name__ == "__main__":
    main(parse_args())
