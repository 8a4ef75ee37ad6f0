"""Site calibration measured on other clinics' images (calibrate.py; docs/clinic_calibration.md):
the HAM10000 threshold against the site's own, chosen on one set of the site's images and scored
on another, with nothing chosen on the scored images.

- PH2 (100 images, 20 melanomas): two folds drawn once (seed 0, stratified by diagnosis);
  calibrate on one half, score the other, both ways.
- ISIC 2017: calibrated on its 150 val images by calibrate.py (--hide-metadata: its test images
  carry no age or sex), scored on its 600 test images.
For each: recall and specificity at recall_bound with the HAM10000 threshold and with the site's
(exact 95% intervals), the recalibrated probability's Brier score and expected calibration error
on the scored images against the model's own. Then "how many labelled images does a site need?":
--draws draws (with replacement) of 25, 50, 100 and 150 of ISIC 2017's val images, each choosing
recall_bound as calibrate.py does, scored on the 600 test images: the spread of test recall and
specificity. It reads probability files only (calibrate.py's site_probs.csv, evaluate.py's
test_probs.csv), the same operating-point and recalibration functions as calibrate.py.

Writes <out>.json, <out>.md and <out>_sample_size.png.

Example: python bench/site_calibration.py --ham-thresholds models/reference/thresholds.json \\
             --ph2 runs/X/compact_ph2/test_probs.csv --isic-val runs/sites/clinics/isic2017_val/site_probs.csv \\
             --isic-test runs/X/clinics_isic2017_test/test_probs.csv --out bench/results/site_calibration
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import (atomic_path, calibration_errors, exact_interval, fit_recalibration, new_figure,  # noqa: E402
                    one_line_errors, recalibrated, save_figure, site_operating_points, threshold_metrics, write_json)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ham-thresholds", type=Path, required=True, help="the model's own thresholds.json")
    p.add_argument("--ph2", type=Path, required=True, help="the model's probabilities of PH2's 100 images")
    p.add_argument("--isic-val", type=Path, required=True, help="calibrate.py's site_probs.csv of ISIC 2017 val")
    p.add_argument("--isic-test", type=Path, required=True, help="the model's probabilities of ISIC 2017 test")
    p.add_argument("--target-recall", type=float, default=0.90)
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def scored(labels, probs, threshold):
    m = threshold_metrics(labels, probs, threshold)
    return {"threshold": float(threshold), "recall": m["recall"], "recall_ci": exact_interval(m["tp"], m["tp"] + m["fn"]),
            "specificity": m["specificity"], "specificity_ci": exact_interval(m["tn"], m["tn"] + m["fp"]),
            "found": m["tp"], "malignant": m["tp"] + m["fn"]}


def calibrate_and_score(name, calib, test, ham_threshold, target):
    """Choose on calib (label, prob, lesion_id), score test (label, prob)."""
    points, method, warnings = site_operating_points(calib["label"], calib["prob"], calib["lesion_id"], target)
    calibration = fit_recalibration(calib["label"], calib["prob"])
    after = recalibrated(test["prob"], calibration)
    brier_before, ece_before = calibration_errors(test["label"], test["prob"])
    brier_after, ece_after = calibration_errors(test["label"], after)
    return {"setting": name, "calibration_images": len(calib), "calibration_malignant": int(calib["label"].sum()),
            "scored_images": len(test), "scored_malignant": int(test["label"].sum()), "bound_method": method,
            "warnings": warnings, "ham": scored(test["label"], test["prob"], ham_threshold),
            "site": scored(test["label"], test["prob"], points["recall_bound"]),
            "recalibration": calibration["method"], "brier_before": brier_before, "brier_after": brier_after,
            "ece_before": ece_before, "ece_after": ece_after}


def read(path, columns=("label", "prob")):
    frame = pd.read_csv(path)
    if "label" not in frame and "malignant" in frame:
        frame = frame.rename(columns={"malignant": "label"})
    missing = [c for c in columns if c not in frame]
    if missing:
        sys.exit(f"error: {path}: no column {', '.join(missing)}")
    if "lesion_id" not in frame:
        frame["lesion_id"] = frame["image_id"]
    return frame


def ci(value, interval):
    return f"{value:.3f} ({interval[0]:.3f}-{interval[1]:.3f})"


@one_line_errors
def main(args):
    ham_threshold = json.loads(args.ham_thresholds.read_text())["thresholds"]["recall_bound"]
    ph2, isic_val, isic_test = read(args.ph2), read(args.isic_val), read(args.isic_test)
    # two PH2 folds, stratified by label, drawn once
    rng = np.random.default_rng(args.seed)
    fold = np.zeros(len(ph2), int)
    for label in (0, 1):
        where = np.flatnonzero(ph2["label"].to_numpy() == label)
        fold[rng.permutation(where)[: len(where) // 2]] = 1
    settings = [calibrate_and_score("PH2, calibrated on fold A, scored on fold B", ph2[fold == 0], ph2[fold == 1],
                                    ham_threshold, args.target_recall),
                calibrate_and_score("PH2, calibrated on fold B, scored on fold A", ph2[fold == 1], ph2[fold == 0],
                                    ham_threshold, args.target_recall),
                calibrate_and_score("ISIC 2017, calibrated on val (150), scored on test (600)", isic_val, isic_test,
                                    ham_threshold, args.target_recall)]

    sizes, samples = (25, 50, 100, 150), []
    labels, probs = isic_val["label"].to_numpy(), isic_val["prob"].to_numpy()
    for size in sizes:
        for _ in tqdm(range(args.draws), desc=f"{size} images"):
            pick = rng.integers(0, len(isic_val), size)
            if labels[pick].min() == labels[pick].max():
                continue
            points, _, _ = site_operating_points(labels[pick], probs[pick], np.arange(size), args.target_recall)
            m = threshold_metrics(isic_test["label"], isic_test["prob"], points["recall_bound"])
            samples.append({"size": size, "malignant": int(labels[pick].sum()), "recall": m["recall"],
                            "specificity": m["specificity"]})
    samples = pd.DataFrame(samples)
    spread = samples.groupby("size").agg(
        draws=("recall", "size"), malignant=("malignant", "median"),
        recall_median=("recall", "median"), recall_p5=("recall", lambda x: x.quantile(0.05)),
        recall_p95=("recall", lambda x: x.quantile(0.95)), share_recall_085=("recall", lambda x: (x >= 0.85).mean()),
        specificity_median=("specificity", "median"), specificity_p5=("specificity", lambda x: x.quantile(0.05)),
        specificity_p95=("specificity", lambda x: x.quantile(0.95))).reset_index()

    lines = [f"HAM10000 recall_bound threshold {ham_threshold:.3f}; the site's recall_bound for {args.target_recall} "
             "(exact binomial bound below 100 malignant lesions); 95% exact intervals on the scored images.", "",
             "| setting | threshold from | threshold | test recall | found | test specificity | Brier | ECE |",
             "|---|---|---|---|---|---|---|---|"]
    for s in settings:
        for source in ("ham", "site"):
            r = s[source]
            brier = s["brier_before"] if source == "ham" else s["brier_after"]
            ece = s["ece_before"] if source == "ham" else s["ece_after"]
            lines.append(f"| {s['setting']} | {'HAM10000' if source == 'ham' else 'the site'} | {r['threshold']:.3f} | "
                         f"{ci(r['recall'], r['recall_ci'])} | {r['found']} of {r['malignant']} | "
                         f"{ci(r['specificity'], r['specificity_ci'])} | {brier:.3f} | {ece:.3f} |")
    for source in ("ham", "site"):  # PH2's two scored halves together: every image scored once
        found = sum(s[source]["found"] for s in settings[:2])
        kept = sum(s[source]["specificity"] * (s["scored_images"] - s["scored_malignant"]) for s in settings[:2])
        benign = sum(s["scored_images"] - s["scored_malignant"] for s in settings[:2])
        malignant = sum(s["scored_malignant"] for s in settings[:2])
        lines.append(f"| PH2, both folds together | {'HAM10000' if source == 'ham' else 'the site'} | | "
                     f"{ci(found / malignant, exact_interval(found, malignant))} | {found} of {malignant} | "
                     f"{ci(kept / benign, exact_interval(round(kept), benign))} | | |")
    lines += ["", "Brier and ECE: the model's probability in the HAM10000 rows, the site's recalibrated one "
              "(fitted on the calibration images) in the site rows, both on the scored images.", "",
              f"How many labelled images does a site need? {args.draws} draws of each size from ISIC 2017 val, "
              "scored on ISIC 2017 test at each draw's recall_bound:", "",
              "| images | draws | malignant (median) | test recall: median (5th-95th) | share with recall >= 0.85 | "
              "test specificity: median (5th-95th) |", "|---|---|---|---|---|---|"]
    for r in spread.to_dict("records"):
        lines.append(f"| {r['size']} | {r['draws']} | {r['malignant']:.0f} | {r['recall_median']:.3f} "
                     f"({r['recall_p5']:.3f}-{r['recall_p95']:.3f}) | {r['share_recall_085']:.2f} | "
                     f"{r['specificity_median']:.3f} ({r['specificity_p5']:.3f}-{r['specificity_p95']:.3f}) |")
    text = "\n".join(lines) + "\n"
    print(text)

    fig, ax = new_figure(ncols=2, figsize=(10, 4.5))
    for axis, metric in zip(ax, ("recall", "specificity")):
        axis.boxplot([samples.loc[samples["size"] == size, metric] for size in sizes], whis=(5, 95), showfliers=False)
        axis.set_xticks(range(1, len(sizes) + 1), [str(s) for s in sizes])
        axis.set(xlabel="labelled site images (ISIC 2017 val draws)", ylabel=f"ISIC 2017 test {metric}",
                 title=f"test {metric} at the site's recall_bound", ylim=(0, 1.02))
        if metric == "recall":
            axis.axhline(0.85, ls=":", color="grey")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, args.out.with_name(args.out.name + "_sample_size.png"))
    write_json({"settings": settings, "sample_size": spread.to_dict("records")}, args.out.with_suffix(".json"))
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text(text)


if __name__ == "__main__":
    main(parse_args())
