"""Step 3: train a benign/malignant classifier on the preprocess cache.

Reads the cache of preprocess.py (index.csv with train/val splits, images.npy, crops.npy, masks.npy).
Writes into the run folder:
  model.pt        the best epoch by validation ROC-AUC: weights plus everything needed to rebuild
                  the model and its preprocessing (arch, normalisation, input form, image size)
  last.pt         the latest epoch with optimiser and scheduler state, for --resume
  history.csv     epoch, train_loss, val_loss, val_auc, lr, seconds
  val_probs.csv   image_id, lesion_id, dx, label (1 = malignant), prob, from the best epoch
  config.json     all arguments, library versions, git commit, the cache key

Example: python train.py --cache cache/ham224_224 --run-dir runs/lite0 --arch efficientnet_lite0
"""
import argparse
import copy
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
from torchvision.transforms import v2
from tqdm import tqdm

from common import (ARCHS, INPUTS, binary_metrics, build_model, fail, git_commit, load_cache,
                    model_inputs, pick_device, predict_probs, read_json,
                    save_checkpoint, to_model_tensor, write_csv, write_json)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, required=True, help="cache folder written by preprocess.py")
    p.add_argument("--run-dir", type=Path, required=True, help="folder for the run's outputs")
    p.add_argument("-a", "--arch", default="efficientnet_lite0", choices=ARCHS)
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="train from scratch instead of from ImageNet weights")
    p.add_argument("--weights", type=Path, help="local ImageNet state dict (no download)")
    p.add_argument("--loss", default="wbce", choices=["ce", "bce", "wbce"],
                   help="ce: 2-class CrossEntropy; bce: BCEWithLogits; wbce: with pos_weight")
    p.add_argument("--pos-weight", type=float,
                   help="wbce weight of the malignant class (default: negatives/positives of train)")
    p.add_argument("--aug", default="full", choices=["none", "basic", "full"],
                   help="basic: flips; full: flips, rotation, RandomResizedCrop, colour jitter, noise")
    p.add_argument("--input", default="full", choices=INPUTS, help="whole image, masked, or lesion crop")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of Adam")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-epochs", type=float, default=0.5, help="linear warm-up before the cosine decay")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for torch")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last.pt")
    return p.parse_args(argv)


def make_augment(level, img_size):
    """Per-image random transforms on uint8 CHW tensors (torchvision.transforms.v2). Dermoscopy
    has no up or down, so vertical flips and any rotation are fair."""
    if level == "none":
        return None
    steps = [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if level == "full":
        steps = [v2.RandomResizedCrop(img_size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
                 *steps, v2.RandomRotation(180),
                 v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)]
    return v2.Compose(steps)


def add_noise(x, sigma=0.02):
    """Gaussian noise on a batch already normalised to model input."""
    return x + sigma * torch.randn_like(x)


def make_criterion(loss, pos_weight):
    if loss == "ce":
        return torch.nn.CrossEntropyLoss()
    weight = torch.tensor([pos_weight]) if loss == "wbce" else None
    return torch.nn.BCEWithLogitsLoss(pos_weight=weight)


def loss_targets(loss, labels):
    return labels.long() if loss == "ce" else labels.float().unsqueeze(1)


def cosine_with_warmup(optimizer, warmup_steps, total_steps):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(model, images, labels, criterion, optimizer, scheduler, augment, args, normalisation,
                    device, epoch):
    """One pass over the training images in a random order; returns the mean loss."""
    model.train()
    order = torch.randperm(len(images))
    total, seen = 0.0, 0
    bar = tqdm(range(0, len(order), args.batch_size), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
    for start in bar:
        idx = order[start:start + args.batch_size]
        if len(idx) < 2:  # BatchNorm cannot train on a single image
            continue
        batch = images[idx].permute(0, 3, 1, 2)
        if augment is not None:
            batch = torch.stack([augment(img) for img in batch])
        x = to_model_tensor(batch.permute(0, 2, 3, 1), normalisation)
        if args.aug == "full":
            x = add_noise(x)
        x, y = x.to(device), loss_targets(args.loss, labels[idx]).to(device)
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(idx)
        seen += len(idx)
        bar.set_postfix(loss=f"{total / seen:.4f}")
    return total / max(1, seen)


def log_loss(labels, probs):
    """Unweighted binary cross-entropy of probabilities: comparable across --loss choices."""
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def main(args):
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)

    index, arrays = load_cache(args.cache)
    train_rows, val_rows = index[index["split"] == "train"], index[index["split"] == "val"]
    for name, rows in (("train", train_rows), ("val", val_rows)):
        if rows["malignant"].nunique() < 2:
            fail(args.cache / "index.csv", f"the {name} split needs benign and malignant images")
    img_size = arrays["full"].shape[1]
    train_images = torch.from_numpy(model_inputs(arrays, train_rows["row"], args.input))
    train_labels = torch.tensor(train_rows["malignant"].to_numpy())
    val_images = model_inputs(arrays, val_rows["row"], args.input)
    val_labels = val_rows["malignant"].to_numpy()

    n_pos = int(train_labels.sum())
    pos_weight = args.pos_weight or (len(train_labels) - n_pos) / n_pos
    num_outputs = 2 if args.loss == "ce" else 1
    model, normalisation = build_model(args.arch, num_outputs, args.pretrained, args.weights)
    model.to(device)
    criterion = make_criterion(args.loss, pos_weight).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_images) / args.batch_size)
    scheduler = cosine_with_warmup(optimizer, int(args.warmup_epochs * steps_per_epoch),
                                   args.epochs * steps_per_epoch)
    augment = make_augment(args.aug, img_size)

    args.run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_base = {
        "arch": args.arch, "num_outputs": num_outputs, "normalisation": normalisation,
        "input": args.input, "img_size": img_size, "task": "binary", "loss": args.loss,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    history, best_auc, best_loss, start_epoch, best_state = [], -1.0, math.inf, 0, None
    if args.resume:
        last_path = args.run_dir / "last.pt"
        if not last_path.is_file():
            fail(last_path, "nothing to resume")
        last = torch.load(last_path, map_location="cpu", weights_only=True)
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        torch.set_rng_state(last["rng_state"])
        start_epoch, history = last["epoch"] + 1, last["history"]
        best_auc, best_loss = last["best_val_auc"], last["best_val_loss"]
        best_state = torch.load(args.run_dir / "model.pt", map_location="cpu", weights_only=True)["model"]
        print(f"resumed {args.run_dir} after epoch {start_epoch}")

    print(f"training {args.arch} on {len(train_images)} images ({n_pos} malignant), validating on "
          f"{len(val_images)}, {img_size}px {args.input} input, device {device}")
    for epoch in range(start_epoch, args.epochs):
        started = time.time()
        train_loss = train_one_epoch(model, train_images, train_labels, criterion, optimizer, scheduler,
                                     augment, args, normalisation, device, epoch=epoch)
        val_probs = predict_probs(model, val_images, normalisation, device)
        val_auc = binary_metrics(val_labels, val_probs, 0.5)["roc_auc"]
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": log_loss(val_labels, val_probs),
                        "val_auc": val_auc, "lr": optimizer.param_groups[0]["lr"],
                        "seconds": round(time.time() - started, 1)})
        row = history[-1]
        print(f"epoch {row['epoch']:3d}  train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
              f"val_auc {val_auc:.4f}  {row['seconds']:.0f}s")
        # Ties in AUC (common on small validation sets) go to the lower validation loss.
        if (val_auc, -row["val_loss"]) > (best_auc, -best_loss):
            best_auc, best_loss, best_state = val_auc, row["val_loss"], copy.deepcopy(model.state_dict())
            save_checkpoint({**checkpoint_base, "model": best_state, "epoch": epoch + 1,
                             "val_auc": val_auc}, args.run_dir / "model.pt")
        save_checkpoint({**checkpoint_base, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "rng_state": torch.get_rng_state(),
                         "epoch": epoch, "best_val_auc": best_auc, "best_val_loss": best_loss,
                         "history": history},
                        args.run_dir / "last.pt")
        write_csv(pd.DataFrame(history), args.run_dir / "history.csv")

    model.load_state_dict(best_state)
    val_out = val_rows[["image_id", "lesion_id", "dx"]].copy()
    val_out["label"] = val_labels
    val_out["prob"] = predict_probs(model, val_images, normalisation, device)
    write_csv(val_out, args.run_dir / "val_probs.csv")
    write_json({"args": checkpoint_base["args"], "device": str(device), "pos_weight": pos_weight,
                "n_train": len(train_images), "n_val": len(val_images), "best_val_auc": best_auc,
                "cache_key": read_json(args.cache / "cache_key.json"), "git_commit": git_commit(),
                "versions": {"python": platform.python_version(), "torch": torch.__version__,
                             "torchvision": torchvision.__version__, "numpy": np.__version__}},
               args.run_dir / "config.json")
    print(f"best val_auc {best_auc:.4f}; wrote {args.run_dir}")


if __name__ == "__main__":
    main(parse_args())
