"""Train the learned lesion segmenter: a U-Net with EfficientNet-Lite0's ImageNet weights as encoder.

Reads data/<dataset>/metadata.csv and the ground-truth masks its mask column names (fetch_data.py
imports them: ham10000_full's 10,015 expert masks, isic2018_task1's, PH2's, the synthetic data's).
It learns from the train split and chooses on the val split; the test split is never read.

A dataset of several sources (fetch_data.py --from-dir A B: its source column) is several mask
conventions: each source is scored on its own val images, and the epoch and the mask threshold
are chosen on the mean of the sources' val Dice, each source counting once. --source-weight
NAME=W sets a source's share of an epoch's draws (by default every train image once an epoch;
with weights an epoch still draws as many images, each source's share W / sum of the weights).
Writes into its output folder:
  model.pt      the best epoch by validation Dice: weights, input size, normalisation and
                mask_threshold, the probability cut chosen on validation (the file
                preprocess.py --segmenter unet --segmenter-model reads)
  last.pt       the latest epoch with optimiser, scheduler and RNG state, for --resume
  history.csv   epoch, train_loss, val_dice, val_jaccard, val_share_jaccard_below_0.65 (means over
                the sources), the same per source (val_dice_<source>, ...), lr, seconds, images_per_s
  thresholds.csv  the best epoch's validation scores at each mask threshold tried, per source
Images and masks are read once, at the network's input size (160x128), and augmented on the
fly as whole batches: flips, rotation, zoom and shift (the same for image and mask), brightness,
contrast, colour balance, noise. The loss is BCE + soft Dice.

Examples: python train_segmenter.py --data data/hamfull --run-dir runs/segmenter
          python train_segmenter.py --data data/ham+isic2018 --source-weight ham10000_full=1 \
              --source-weight isic2018_task1=1 --run-dir runs/segmenter
"""
import math
import os
import time
from argparse import ArgumentTypeError
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (METADATA_COLUMNS, SEGMENTER_ARCH, SEGMENTER_SIZE, ArgumentParser, autocast_dtype,
                    cosine_with_warmup, fail, git_commit, load_torch_file, lock_output, logit, number_in,
                    one_line_errors, optimisation_step, pick_device, prepare_model, read_csv, read_mask, read_rgb,
                    save_checkpoint, segmenter_logits, write_csv, write_json)
from networks import build_segmenter


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--data", type=Path, required=True, help="dataset folder whose metadata.csv has a mask column")
    p.add_argument("--run-dir", type=Path, required=True, help="folder for the segmenter's outputs")
    p.add_argument("--epochs", type=number_in(int, 1), default=10)
    p.add_argument("-b", "--batch-size", type=number_in(int, 2), default=32)
    p.add_argument("--lr", type=number_in(float, 0, low_open=True), default=1e-3, help="peak learning rate (Adam)")
    p.add_argument("--warmup-epochs", type=number_in(float, 0), default=0.3)
    p.add_argument("--limit", type=number_in(int, 2), help="use only the first N train and N val images (a quick run)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="train the encoder from scratch instead of from ImageNet weights")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="as train.py: bf16 where the device has it natively, else fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--threads", type=number_in(int, 1), help="CPU threads for torch (default: all cores)")
    p.add_argument("--source-weight", action="append", default=[], metavar="SOURCE=W", type=source_weight,
                   help="a source's relative share of each epoch's draws (repeat per source; default: as many "
                        "draws as it has train images)")
    p.add_argument("--resume", action="store_true", help="continue from its output folder's last.pt")
    return p.parse_args(argv)


def source_weight(text):
    name, _, weight = text.partition("=")
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not name or not math.isfinite(value) or value <= 0:
        raise ArgumentTypeError(f"'{text}' is not SOURCE=W with a positive weight W")
    return name, value


MASK_THRESHOLDS = np.round(np.arange(0.30, 0.701, 0.05), 2)  # the probability cuts tried on validation
VAL_SCORES = ("val_dice", "val_jaccard", "val_share_jaccard_below_0.65")  # per source, and their means


def load_split(metadata, data_dir, split, limit):
    """(images N x H x W x 3 uint8, masks N x H x W uint8 0-255, source of each) of a split's rows
    that have a mask, resized once to the network's input size (a mask's border pixels keep their
    partial cover). limit: the first N of each source."""
    rows = metadata[(metadata["split"] == split) & metadata["mask"].notna()]
    rows = rows.groupby("source", sort=False).head(limit) if limit else rows
    width, height = SEGMENTER_SIZE
    images = np.zeros((len(rows), height, width, 3), np.uint8)
    masks = np.zeros((len(rows), height, width), np.uint8)
    for i, row in enumerate(tqdm(rows.itertuples(), total=len(rows), desc=f"reading {split} images", leave=False)):
        images[i] = cv2.resize(read_rgb(data_dir / row.filename), SEGMENTER_SIZE, interpolation=cv2.INTER_AREA)
        mask = read_mask(data_dir / row.mask).astype(np.float32)
        masks[i] = np.round(255 * cv2.resize(mask, SEGMENTER_SIZE, interpolation=cv2.INTER_AREA))
    return images, masks, rows["source"].to_numpy()


def augment(images, masks, normalisation):
    """Random geometry shared by images and masks (N x C x H x W floats in [0, 1]), then colour
    changes and noise on the images, which are returned normalised for the network."""
    n, _, h, w = images.shape
    angle = torch.rand(n) * 2 * math.pi
    zoom = 0.8 + 0.4 * torch.rand(n)
    flip = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    shift = (torch.rand(n, 2) - 0.5) * 0.2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # a rotation in pixels, written in affine_grid's coordinates, which run from -1 to 1 on both sides
    theta = torch.stack([torch.stack([cos * flip, -sin * h / w, shift[:, 0]], 1),
                         torch.stack([sin * flip * w / h, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # what turns into view is black, as a dermatoscope's vignette, and no lesion
    images = F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)
    masks = F.grid_sample(masks, grid, padding_mode="zeros", align_corners=False)
    brightness = 0.8 + 0.4 * torch.rand(n, 1, 1, 1)
    contrast = 0.8 + 0.4 * torch.rand(n, 1, 1, 1)
    balance = 0.9 + 0.2 * torch.rand(n, 3, 1, 1)  # another camera's white balance
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = ((images - mean) * contrast + mean) * brightness * balance + 0.02 * torch.randn_like(images)
    images = images.clamp(0, 1)
    mean, std = (torch.tensor(normalisation[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    return (images - mean) / std, masks


def dice_bce_loss(logits, masks):
    """BCE (pixels) plus 1 - soft Dice (per image, then averaged): BCE alone favours the background
    of small lesions, Dice alone trains unsteadily."""
    probs = torch.sigmoid(logits)
    overlap = (probs * masks).sum(dim=(1, 2, 3))
    dice = (2 * overlap + 1) / (probs.sum(dim=(1, 2, 3)) + masks.sum(dim=(1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, masks) + (1 - dice).mean()


def validation_scores(model, images, masks, sources, normalisation, thresholds=(0.5,), batch_size=64):
    """Per mask threshold (a probability cut, against cover >= 50%), at the network's size: mean
    Dice, mean Jaccard and share of images with Jaccard < 0.65, per source (val_dice_<source>, ...)
    and as means over the sources (val_dice, ...), each source counting once."""
    model.eval()
    cuts = logit(thresholds)
    dice, jaccard = np.zeros((len(cuts), len(images))), np.zeros((len(cuts), len(images)))
    for start in range(0, len(images), batch_size):
        logits = segmenter_logits(model, images[start:start + batch_size], normalisation)
        truth = masks[start:start + batch_size] >= 128
        for k, cut in enumerate(cuts):
            predicted = logits > cut
            overlap = (predicted & truth).sum(axis=(1, 2))
            total = predicted.sum(axis=(1, 2)) + truth.sum(axis=(1, 2))
            dice[k, start:start + len(truth)] = np.where(total > 0, 2 * overlap / np.maximum(total, 1), 1.0)
            jaccard[k, start:start + len(truth)] = np.where(total > 0, overlap / np.maximum(total - overlap, 1), 1.0)
    results = []
    for k in range(len(cuts)):
        by_source = {source: {"val_dice": dice[k, sources == source].mean(),
                              "val_jaccard": jaccard[k, sources == source].mean(),
                              "val_share_jaccard_below_0.65": (jaccard[k, sources == source] < 0.65).mean()}
                     for source in np.unique(sources)}
        row = {name: float(np.mean([scores[name] for scores in by_source.values()])) for name in VAL_SCORES}
        row.update({f"{name}_{source}": float(scores[name]) for source, scores in by_source.items() for name in scores})
        results.append(row)
    return results


@one_line_errors
def main(args):
    lock_output(args.run_dir)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = pick_device(args.device)
    metadata_path = args.data / "metadata.csv"
    metadata = read_csv(metadata_path, METADATA_COLUMNS)
    if "mask" not in metadata.columns or metadata["mask"].isna().all():
        fail(metadata_path, "has no ground-truth masks (a mask column); import a source that has them, "
             "e.g. fetch_data.py --from-dir ../shared/data/ham10000_full")
    if "source" not in metadata.columns:
        metadata["source"] = args.data.name
    metadata["source"] = metadata["source"].fillna(args.data.name).astype(str)
    train_images, train_masks, train_sources = load_split(metadata, args.data, "train", args.limit)
    val_images, val_masks, val_sources = load_split(metadata, args.data, "val", args.limit)
    if len(train_images) < 2 or len(val_images) == 0:
        fail(metadata_path, "needs masks for at least 2 train and 1 val images")
    weights = dict(args.source_weight)
    sources = sorted(set(train_sources))
    unknown = sorted(set(weights) - set(sources))
    if unknown:
        fail(metadata_path, f"has no train masks of source {', '.join(unknown)} (--source-weight; its sources: "
             f"{', '.join(sources)})")
    if weights and set(weights) != set(sources):
        fail(metadata_path, f"has train masks of {', '.join(sorted(set(sources) - set(weights)))} too: give every "
             "source a --source-weight, or none")
    unvalidated = sorted(set(sources) - set(val_sources))
    if unvalidated:
        fail(metadata_path, f"has no val masks of source {', '.join(unvalidated)}: a source is chosen on too")

    model, normalisation = build_segmenter(args.pretrained)
    model = prepare_model(model, device)
    dtype = autocast_dtype(args.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = math.ceil(len(train_images) / args.batch_size)
    scheduler = cosine_with_warmup(optimizer, int(args.warmup_epochs * steps_per_epoch), args.epochs * steps_per_epoch)
    checkpoint_base = {"arch": SEGMENTER_ARCH, "input_size": list(SEGMENTER_SIZE), "normalisation": normalisation,
                       "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}

    history, best_dice, start_epoch = [], -1.0, 0
    if args.resume:
        last_path = args.run_dir / "last.pt"
        if not last_path.is_file():
            fail(last_path, "nothing to resume")
        last = load_torch_file(last_path, "checkpoint")
        best = load_torch_file(args.run_dir / "model.pt", "checkpoint (the best epoch, needed beside last.pt)")
        try:
            model.load_state_dict(best["model"])  # only to check that the best epoch's file fits too
            model.load_state_dict(last["model"])
            optimizer.load_state_dict(last["optimizer"])
            scheduler.load_state_dict(last["scheduler"])
            torch.set_rng_state(last["rng_state"])
            start_epoch, history, best_dice = last["epoch"] + 1, last["history"], last["best_val_dice"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            fail(last_path, f"does not fit this run ({type(e).__name__} {str(e).splitlines()[0][:120]}); "
                 "train into another --run-dir")
        print(f"resumed {args.run_dir} after epoch {start_epoch}")
    args.run_dir.mkdir(parents=True, exist_ok=True)
    counts = {source: (int((train_sources == source).sum()), int((val_sources == source).sum())) for source in sources}
    print(f"training the {SEGMENTER_ARCH} segmenter on {len(train_images)} masks, choosing the epoch on "
          f"{len(val_images)} ({'; '.join(f'{s}: {t} train, {v} val' for s, (t, v) in counts.items())}); "
          f"{SEGMENTER_SIZE[0]}x{SEGMENTER_SIZE[1]} px, device {device}")

    all_images = torch.from_numpy(train_images).permute(0, 3, 1, 2)  # N x 3 x H x W uint8, a view
    all_masks = torch.from_numpy(train_masks)[:, None]
    for epoch in range(start_epoch, args.epochs):
        started = time.time()
        model.train()
        order = torch.from_numpy(epoch_order(train_sources, weights, np.random.default_rng(args.seed + epoch)))
        total, seen = 0.0, 0
        bar = tqdm(range(0, len(order), args.batch_size), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        for start in bar:
            idx = order[start:start + args.batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on a single image
                continue
            x, y = augment(all_images[idx].float() / 255, all_masks[idx].float() / 255, normalisation)
            x = x.contiguous(memory_format=torch.channels_last).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(x).float()
            loss = dice_bce_loss(logits, y.to(device))
            optimisation_step(loss, optimizer, scaler, scheduler)
            total += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        speed = seen / (time.time() - started)
        scores = validation_scores(model, val_images, val_masks, val_sources, normalisation)[0]
        history.append({"epoch": epoch + 1, "train_loss": total / max(seen, 1), **scores,
                        "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - started, 1),
                        "images_per_s": round(speed, 1)})
        by_source = "  ".join(f"{s} {scores[f'val_dice_{s}']:.4f}" for s in sources) if len(sources) > 1 else ""
        print(f"epoch {epoch + 1:3d}  train_loss {history[-1]['train_loss']:.4f}  val_dice {scores['val_dice']:.4f}  "
              f"{by_source}  Jaccard < 0.65 {scores['val_share_jaccard_below_0.65']:.1%}  "
              f"{history[-1]['seconds']:.0f}s  {speed:.0f} img/s")
        if scores["val_dice"] > best_dice:
            best_dice = scores["val_dice"]
            save_checkpoint({**checkpoint_base, "model": model.state_dict(), "epoch": epoch + 1, **scores,
                             "mask_threshold": 0.5}, args.run_dir / "model.pt")
        save_checkpoint({**checkpoint_base, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "rng_state": torch.get_rng_state(), "epoch": epoch,
                         "best_val_dice": best_dice, "history": history}, args.run_dir / "last.pt")
        write_csv(pd.DataFrame(history), args.run_dir / "history.csv")
    threshold, best_scores = choose_mask_threshold(model, args.run_dir, val_images, val_masks, val_sources,
                                                   normalisation)
    write_json({"args": checkpoint_base["args"], "device": str(device), "n_train": len(train_images),
                "n_val": len(val_images), "sources": counts, "best_val_dice": best_scores["val_dice"],
                "mask_threshold": threshold, "val_scores": best_scores, "git_commit": git_commit(),
                "torch": torch.__version__}, args.run_dir / "config.json")
    print(f"best validation Dice {best_scores['val_dice']:.4f} at mask threshold {threshold:.2f}"
          + "".join(f"; {s} {best_scores[f'val_dice_{s}']:.4f}" for s in sources if len(sources) > 1)
          + f"; wrote {args.run_dir / 'model.pt'}")


def epoch_order(sources, weights, rng):
    """The train rows one epoch visits, shuffled: each once, or with weights, each source's share of
    len(sources) draws (its images in turn, reshuffled each time round, so none twice before all once)."""
    if not weights:
        return rng.permutation(len(sources))
    total = sum(weights.values())
    draws = []
    for source, weight in weights.items():
        rows = np.flatnonzero(sources == source)
        wanted = round(len(sources) * weight / total)
        rounds = [rng.permutation(rows) for _ in range(math.ceil(wanted / len(rows)))]
        draws.append(np.concatenate(rounds)[:wanted])
    return rng.permutation(np.concatenate(draws))


def choose_mask_threshold(model, run_dir, images, masks, sources, normalisation):
    """The probability cut of the best epoch's masks with the highest validation Dice (the mean over
    sources), written into model.pt beside its scores there; every cut's scores to thresholds.csv."""
    best = load_torch_file(run_dir / "model.pt", "checkpoint")
    model.load_state_dict(best["model"])
    results = validation_scores(model, images, masks, sources, normalisation, MASK_THRESHOLDS)
    write_csv(pd.DataFrame([{"mask_threshold": t, **r} for t, r in zip(MASK_THRESHOLDS, results)]),
              run_dir / "thresholds.csv")
    k = int(np.argmax([r["val_dice"] for r in results]))
    save_checkpoint({**best, **results[k], "mask_threshold": float(MASK_THRESHOLDS[k])}, run_dir / "model.pt")
    return float(MASK_THRESHOLDS[k]), results[k]


if __name__ == "__main__":
    main(parse_args())
