"""Collect the second edition's single reading of its test sets into one table (docs/second_edition.md,
"Results, second edition").

Each --read names an evaluation folder written by evaluate.py (metrics.csv, and
multiclass_metrics.csv for 7-class models) and the label of its test set, as FOLDER:LABEL. The
run that made it is the folder itself or its parent (the one with config.json). Writes <out>.csv
(one row per evaluation and operating point, with 95% intervals) and <out>.md, and prints the
Markdown; an evaluation with multiclass_metrics.csv adds its per-class table (the seven classes,
95% intervals over lesions) under the main one. With --plots DIR, each evaluation's ROC curve and
confusion matrices are copied there, named after its label. Beside evaluate.py's intervals (over
images), the ROC-AUC's 95% interval over lesions (test_probs.csv's lesion_id: a lesion's images
drawn together; an image without a lesion id is a lesion of its own).

Example: python bench/study2.py --read "runs/study2/final/F1:HAM10000 test" \
    "runs/study2/final/F1/ph2:PH2" --out bench/results/study2_final --plots docs/results/study2
"""
import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import (class_table_lines, fail, group_members, group_resamples, one_line_errors,  # noqa: E402
                    ranking_metrics, read_csv, write_table_and_markdown)
from study import METRICS, balanced_accuracy_7, copy_plots, describe  # noqa: E402

PLOTS = ("roc_curve.png", "pr_curve.png", "confusion_matrix.png", "confusion_matrix_7class.png")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--read", nargs="+", required=True, metavar="FOLDER:LABEL",
                   help="evaluation folders and the names of their test sets")
    p.add_argument("--points", nargs="+", default=["recall_bound", "recall_target", "best_f1"],
                   help="operating points to report, in order")
    p.add_argument("--out", type=Path, required=True, help="output path without suffix")
    p.add_argument("--plots", type=Path, help="copy each evaluation's plots into this folder")
    return p.parse_args(argv)


def run_of(folder):
    for candidate in (folder, folder.parent):
        if (candidate / "config.json").is_file():
            return candidate
    fail(folder, "neither it nor its parent holds a run's config.json")


def lesion_roc_interval(folder, n_resamples=1000, seed=0):
    """The 95% interval of the ROC-AUC over lesions, from the evaluation's test_probs.csv."""
    probs = read_csv(folder / "test_probs.csv", ["image_id", "lesion_id", "label", "prob"])
    labels, scores = probs["label"].to_numpy(), probs["prob"].to_numpy()
    lesions = probs["lesion_id"].where(probs["lesion_id"].notna(), probs["image_id"])
    aucs = [ranking_metrics(labels[pick], scores[pick])["roc_auc"]
            for pick in group_resamples(group_members(lesions), n_resamples, seed) if len(set(labels[pick])) == 2]
    return {"lesions": int(lesions.nunique()), "roc_auc_lesion_lo": float(np.percentile(aucs, 2.5)),
            "roc_auc_lesion_hi": float(np.percentile(aucs, 97.5))}


def collect(reads, points):
    rows = []
    for folder, label in reads:
        info = describe(run_of(folder))
        by_lesion = lesion_roc_interval(folder)
        table = read_csv(folder / "metrics.csv", ["operating_point", *METRICS]).set_index("operating_point")
        extra = balanced_accuracy_7(folder)
        for point in points:
            if point not in table.index:
                fail(folder / "metrics.csv", f"has no operating point '{point}'")
            row = {"system": info["stage"], "data": label, "folder": str(folder), "operating_point": point,
                   "threshold": table.loc[point, "threshold"], "n": table.loc[point, "n"],
                   "n_malignant": table.loc[point, "n_malignant"], "train_minutes": info["train_minutes"], **extra,
                   **by_lesion}
            for m in METRICS:
                row.update({m: table.loc[point, m], f"{m}_lo": table.loc[point, f"{m}_lo"],
                            f"{m}_hi": table.loc[point, f"{m}_hi"]})
            rows.append(row)
    return pd.DataFrame(rows)


def markdown(table):
    head = ["system", "test set (images, malignant)", "point", "ROC-AUC", "PR-AUC", "accuracy", "precision",
            "recall", "specificity", "F1", "7-class bal. acc.", "ROC-AUC interval over lesions"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.to_dict("records"):
        cells = [f"{r[m]:.3f} ({r[m + '_lo']:.3f}-{r[m + '_hi']:.3f})" for m in METRICS]
        balanced = (f"{r['balanced_accuracy_7']:.3f} ({r['balanced_accuracy_7_lo']:.3f}-"
                    f"{r['balanced_accuracy_7_hi']:.3f})" if pd.notna(r.get("balanced_accuracy_7")) else "")
        lines.append(f"| {r['system']} | {r['data']} ({r['n']}, {r['n_malignant']}) | {r['operating_point']} "
                     f"(t={r['threshold']:.3f}) | " + " | ".join(cells) + f" | {balanced} | "
                     f"{r['roc_auc_lesion_lo']:.3f}-{r['roc_auc_lesion_hi']:.3f} ({r['lesions']} lesions) |")
    return "\n".join(lines) + "\n"


def class_sections(reads):
    """Each 7-class evaluation's per-class table: its balanced accuracy is the mean recall over the
    classes the set holds (ISIC 2017 holds three, PH2 two), its macro ROC-AUC the mean over them."""
    lines = []
    for folder, label in reads:
        if (folder / "multiclass_metrics.csv").is_file():
            table = read_csv(folder / "multiclass_metrics.csv", ["class", "support", "predicted", "recall",
                                                                 "precision", "roc_auc"])
            held = ", ".join(table.loc[(table["class"] != "macro") & (table["support"] > 0), "class"])
            lines += ["", f"### {label}: the seven classes (the set holds {held}; macro = over those)", "",
                      *class_table_lines(table)]
    return "\n".join(lines) + "\n" if lines else ""


@one_line_errors
def main(args):
    reads = []
    for item in args.read:
        folder, _, label = item.partition(":")
        if not label:
            fail(item, "is not FOLDER:LABEL")
        reads.append((Path(folder), label))
    table = collect(reads, args.points)
    write_table_and_markdown(table, markdown(table) + class_sections(reads), args.out)
    if args.plots:
        for folder, label in reads:
            slug = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_").lower()
            copy_plots([(folder / name, f"{slug}_{name}") for name in PLOTS], args.plots)
        print(f"copied the plots into {args.plots}")


if __name__ == "__main__":
    main(parse_args())
