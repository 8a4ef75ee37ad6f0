"""Step 5: score a trained model on held-out images at the operating points chosen on validation.

Reads <run>/model.pt, <run>/thresholds.json and a preprocess cache (default: the one the model
was trained on), and predicts one split of it (default test) with the preprocessing the model
was trained with. Writes into --out-dir (default the run folder):
  test_probs.csv         image_id, lesion_id, dx, label, prob
  metrics.csv            one row per operating point: threshold, accuracy, precision, recall,
                         specificity, f1, roc_auc, pr_auc, each with a bootstrap 95% interval
                         (<metric>_lo, <metric>_hi), and the confusion counts
  confusion_matrix.png   counts and row-normalised shares at each operating point
  roc_curve.png, pr_curve.png   with the operating points marked

Example: python evaluate.py --run runs/lite0
"""
import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common import (SPLITS, binary_metrics, fail, ranking_metrics, threshold_metrics, load_cache, load_checkpoint, model_inputs, new_figure,
                    pick_device, plot_pr_curve, predict_probs, read_json, save_figure, write_csv)

METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run folder with model.pt and thresholds.json")
    p.add_argument("--cache", type=Path, help="preprocess cache to predict (default: the training cache)")
    p.add_argument("--split", default="test", choices=[*SPLITS, "all"], help="rows of the cache to predict")
    p.add_argument("--out-dir", type=Path, help="where outputs go (default: the run folder)")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% intervals (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    return p.parse_args(argv)


def bootstrap_intervals(labels, probs, thresholds, n_resamples, seed):
    """95% percentile intervals of every metric at every threshold, from resampling images.
    Resamples that hold a single class are skipped (no AUC exists for them)."""
    rng = np.random.default_rng(seed)
    samples = {name: [] for name in thresholds}
    for _ in range(n_resamples):
        pick = rng.integers(0, len(labels), len(labels))
        if labels[pick].min() == labels[pick].max():
            continue
        ranking = ranking_metrics(labels[pick], probs[pick])
        for name, t in thresholds.items():
            samples[name].append({**threshold_metrics(labels[pick], probs[pick], t), **ranking})
    intervals = {}
    for name, rows in samples.items():
        table = pd.DataFrame(rows)
        intervals[name] = {m: (table[m].quantile(0.025), table[m].quantile(0.975)) if len(table) else
                           (np.nan, np.nan) for m in METRICS}
    return intervals


def metrics_table(labels, probs, thresholds, n_resamples, seed):
    intervals = bootstrap_intervals(labels, probs, thresholds, n_resamples, seed) if n_resamples else None
    rows = []
    for name, t in thresholds.items():
        m = binary_metrics(labels, probs, t)
        row = {"operating_point": name, "threshold": t, "n": len(labels), "n_malignant": int(labels.sum())}
        for metric in METRICS:
            row[metric] = m[metric]
            if intervals is not None:
                row[f"{metric}_lo"], row[f"{metric}_hi"] = intervals[name][metric]
        row.update({k: m[k] for k in ("tp", "fp", "tn", "fn")})
        rows.append(row)
    return pd.DataFrame(rows)


def plot_confusion_matrices(table, path):
    fig, axes = new_figure(ncols=len(table), figsize=(4 * len(table), 3.8))
    axes = np.atleast_1d(axes)
    for ax, row in zip(axes, table.itertuples()):
        counts = np.array([[row.tn, row.fp], [row.fn, row.tp]])
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, f"{counts[i, j]}\n{shares[i, j]:.0%}", ha="center", va="center",
                        color="white" if shares[i, j] > 0.5 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["benign", "malignant"],
               yticklabels=["benign", "malignant"], xlabel="predicted", ylabel="true",
               title=f"{row.operating_point} (t={row.threshold:.3f})")
    save_figure(fig, path)


def plot_roc_curve(labels, probs, table, path):
    from sklearn.metrics import roc_curve
    fpr, tpr, _ = roc_curve(labels, probs)
    fig, ax = new_figure()
    ax.plot(fpr, tpr, label=f"ROC-AUC = {table['roc_auc'].iloc[0]:.3f}")
    for row in table.itertuples():
        ax.plot(1 - row.specificity, row.recall, "o", label=f"{row.operating_point} (t={row.threshold:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="chance")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity (recall)", xlim=(0, 1), ylim=(0, 1.01), title="ROC curve")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def main(args):
    model, checkpoint = load_checkpoint(args.run / "model.pt")
    thresholds = read_json(args.run / "thresholds.json").get("thresholds")
    if not thresholds:
        fail(args.run / "thresholds.json", "has no 'thresholds'; run threshold.py")
    cache = args.cache or Path(checkpoint["args"]["cache"])
    index, arrays = load_cache(cache)
    if arrays["full"].shape[1] != checkpoint["img_size"]:
        fail(cache, f"holds {arrays['full'].shape[1]}px images but the model was trained on "
             f"{checkpoint['img_size']}px; run preprocess.py --img-size {checkpoint['img_size']}")
    rows = index if args.split == "all" else index[index["split"] == args.split]
    if rows.empty:
        fail(cache / "index.csv", f"has no rows in split '{args.split}'")

    device = pick_device(args.device)
    images = model_inputs(arrays, rows["row"], checkpoint["input"])
    probs = predict_probs(model.to(device), images, checkpoint["normalisation"], device)
    labels = rows["malignant"].to_numpy()
    out_dir = args.out_dir or args.run
    test = rows[["image_id", "lesion_id", "dx"]].copy()
    test["label"], test["prob"] = labels, probs
    write_csv(test, out_dir / "test_probs.csv")
    if labels.min() == labels.max():
        fail(cache / "index.csv", f"split '{args.split}' holds one class only; probabilities written, "
             "but no ROC-AUC or interval exists")

    table = metrics_table(labels, probs, thresholds, args.bootstrap, args.seed)
    write_csv(table, out_dir / "metrics.csv")
    plot_confusion_matrices(table, out_dir / "confusion_matrix.png")
    plot_roc_curve(labels, probs, table, out_dir / "roc_curve.png")
    plot_pr_curve(labels, probs, thresholds, out_dir / "pr_curve.png", f"{args.split} precision-recall")
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 160):
        print(table[["operating_point", "threshold", *METRICS]].to_string(index=False))
    print(f"wrote {out_dir / 'metrics.csv'} and plots ({len(rows)} images of {cache}, split {args.split})")


if __name__ == "__main__":
    main(parse_args())
