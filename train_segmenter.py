"""Train the learned lesion segmenter: a U-Net with EfficientNet-Lite0's ImageNet weights as encoder.

Reads data/<dataset>/metadata.csv and the ground-truth masks its mask column names (fetch_data.py
imports them: ham10000_full's 10,015 expert masks, PH2's, the synthetic data's). It learns from the
train split and chooses its epoch by mean Dice on the val split; the test split is never read.
Writes into the run folder:
  model.pt      the best epoch by validation Dice: weights, input size, normalisation (the file
                preprocess.py --segmenter unet --segmenter-model reads)
  last.pt       the latest epoch with optimiser, scheduler and RNG state, for --resume
  history.csv   epoch, train_loss, val_dice, val_jaccard, val_share_jaccard_below_0.65, lr, seconds,
                images_per_s
Images and masks are read once, at the network's input size (160x128), and augmented on the
fly as whole batches: flips, rotation, zoom and shift (the same for image and mask), brightness,
contrast, colour balance, noise. The loss is BCE + soft Dice.

Example: python train_segmenter.py --data data/hamfull --run-dir runs/segmenter
"""
import math
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (METADATA_COLUMNS, SEGMENTER_ARCH, SEGMENTER_SIZE, ArgumentParser, autocast_dtype,
                    build_segmenter, cosine_with_warmup, fail, git_commit, load_torch_file, lock_output, number_in,
                    optimisation_step, pick_device, prepare_model, read_csv, read_mask, read_rgb, save_checkpoint,
                    segmenter_logits, write_csv, write_json)


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
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last.pt")
    return p.parse_args(argv)


def load_split(metadata, data_dir, split, limit):
    """(images N x H x W x 3 uint8, masks N x H x W uint8 0-255) of a split's rows that have a mask,
    resized once to the network's input size (a mask's border pixels keep their partial cover)."""
    rows = metadata[(metadata["split"] == split) & metadata["mask"].notna()].head(limit)
    width, height = SEGMENTER_SIZE
    images = np.zeros((len(rows), height, width, 3), np.uint8)
    masks = np.zeros((len(rows), height, width), np.uint8)
    for i, row in enumerate(tqdm(rows.itertuples(), total=len(rows), desc=f"reading {split} images", leave=False)):
        images[i] = cv2.resize(read_rgb(data_dir / row.filename), SEGMENTER_SIZE, interpolation=cv2.INTER_AREA)
        mask = read_mask(data_dir / row.mask).astype(np.float32)
        masks[i] = np.round(255 * cv2.resize(mask, SEGMENTER_SIZE, interpolation=cv2.INTER_AREA))
    return images, masks


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


def validation_scores(model, images, masks, normalisation, batch_size=64):
    """Mean Dice and Jaccard of the thresholded masks (logit > 0 against cover >= 50%) at the
    network's size, and the share of images with Jaccard < 0.65."""
    model.eval()
    dice, jaccard = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        predicted = segmenter_logits(model, batch, normalisation) > 0
        truth = masks[start:start + batch_size] >= 128
        overlap = (predicted & truth).sum(axis=(1, 2))
        total = predicted.sum(axis=(1, 2)) + truth.sum(axis=(1, 2))
        dice += list(np.where(total > 0, 2 * overlap / np.maximum(total, 1), 1.0))
        jaccard += list(np.where(total > 0, overlap / np.maximum(total - overlap, 1), 1.0))
    dice, jaccard = np.array(dice), np.array(jaccard)
    return {"val_dice": float(dice.mean()), "val_jaccard": float(jaccard.mean()),
            "val_share_jaccard_below_0.65": float((jaccard < 0.65).mean())}


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
    train_images, train_masks = load_split(metadata, args.data, "train", args.limit)
    val_images, val_masks = load_split(metadata, args.data, "val", args.limit)
    if len(train_images) < 2 or len(val_images) == 0:
        fail(metadata_path, "needs masks for at least 2 train and 1 val images")

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
    print(f"training the {SEGMENTER_ARCH} segmenter on {len(train_images)} masks, choosing the epoch on "
          f"{len(val_images)}; {SEGMENTER_SIZE[0]}x{SEGMENTER_SIZE[1]} px, device {device}")

    all_images = torch.from_numpy(train_images).permute(0, 3, 1, 2)  # N x 3 x H x W uint8, a view
    all_masks = torch.from_numpy(train_masks)[:, None]
    for epoch in range(start_epoch, args.epochs):
        started = time.time()
        model.train()
        order = torch.from_numpy(np.random.default_rng(args.seed + epoch).permutation(len(train_images)))
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
        scores = validation_scores(model, val_images, val_masks, normalisation)
        history.append({"epoch": epoch + 1, "train_loss": total / max(seen, 1), **scores,
                        "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - started, 1),
                        "images_per_s": round(speed, 1)})
        print(f"epoch {epoch + 1:3d}  train_loss {history[-1]['train_loss']:.4f}  val_dice {scores['val_dice']:.4f}  "
              f"Jaccard < 0.65 {scores['val_share_jaccard_below_0.65']:.1%}  {history[-1]['seconds']:.0f}s  "
              f"{speed:.0f} img/s")
        if scores["val_dice"] > best_dice:
            best_dice = scores["val_dice"]
            save_checkpoint({**checkpoint_base, "model": model.state_dict(), "epoch": epoch + 1, **scores},
                            args.run_dir / "model.pt")
        save_checkpoint({**checkpoint_base, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "rng_state": torch.get_rng_state(), "epoch": epoch,
                         "best_val_dice": best_dice, "history": history}, args.run_dir / "last.pt")
        write_csv(pd.DataFrame(history), args.run_dir / "history.csv")
    write_json({"args": checkpoint_base["args"], "device": str(device), "n_train": len(train_images),
                "n_val": len(val_images), "best_val_dice": best_dice, "git_commit": git_commit(),
                "torch": torch.__version__}, args.run_dir / "config.json")
    print(f"best validation Dice {best_dice:.4f}; wrote {args.run_dir / 'model.pt'}")


if __name__ == "__main__":
    main(parse_args())
