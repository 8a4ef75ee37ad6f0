"""Compare runs that differ in one setting (make hair-study: the same recipe, data and seed on
caches with each hair removal) on validation and on external images, with paired intervals.

Reads from each model folder: val_probs.csv (its validation split), thresholds.json, and the
probabilities of every further evaluation that all runs have (val_tta/test_probs.csv: validation
read with test-time augmentation, which make threshold writes; isic2017_trainval/test_probs.csv,
ph2/test_probs.csv, written by make external-val and make external). A run's own test split is
not read, except with --test-reads: the test sets make reference-test read (compact_ham10000_test/,
compact_isic2017_test/, compact_ph2/), to set a shipped model beside the one it replaced after
that reading, nothing being chosen on it.

For each data set: ROC-AUC with a 95% bootstrap interval, its difference from the first run with
a paired interval (the same resampled images for every run), and recall and specificity at the
thresholds chosen on validation for recall >= 0.90 (recall_target, and recall_bound where every
run's thresholds.json has it). Writes --out.csv and --out.md.

Example: python bench/hair_study.py --runs runs/hair/legacy runs/hair/on runs/hair/off --out bench/results/hair_study
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import (fail, one_line_errors, ranking_metrics, read_probs, read_thresholds,  # noqa: E402
                    threshold_metrics, write_table_and_markdown)

EXTERNAL = {"val_tta": "validation (HAM10000), test-time augmentation (evaluate.py --tta)",
            "isic2017_trainval": "ISIC 2017 train+val (external validation)",
            "isic2017_trainval_hidden": "ISIC 2017 train+val, age and sex hidden (evaluate.py --hide-metadata)",
            "isic2017_val": "ISIC 2017 val (external, or a second source's validation)", "ph2": "PH2 (external)"}
TEST_READS = {"compact_ham10000_test": "HAM10000 test (make reference-test)",
              "compact_isic2017_test": "ISIC 2017 test (make reference-test)",
              "compact_ph2": "PH2 (make reference-test)"}
POINTS = ("recall_target", "recall_bound")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="model folders; the first is the reference")
    p.add_argument("--out", type=Path, required=True, help="output path without suffix (.csv and .md are written)")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-reads", action="store_true",
                   help="also the test sets make reference-test read, where every run has them")
    return p.parse_args(argv)


def paired_probs(runs, relative):
    """(labels, probabilities of each run (runs x images)) on the images every run scored."""
    tables = [read_probs(run / relative, ("image_id", "label", "prob")).set_index("image_id") for run in runs]
    common_ids = sorted(set.intersection(*(set(t.index) for t in tables)))
    if not common_ids:
        fail(runs[0] / relative, "shares no image with the other runs")
    labels = tables[0].loc[common_ids, "label"].to_numpy()
    return labels, np.stack([t.loc[common_ids, "prob"].to_numpy() for t in tables])


def scores(labels, probs, thresholds, reference_auc=None):
    """ROC-AUC, its difference from the reference, then recall and specificity at each point."""
    auc = ranking_metrics(labels, probs)["roc_auc"]
    values = [auc, auc - (auc if reference_auc is None else reference_auc)]
    for t in thresholds:
        point = threshold_metrics(labels, probs, t)
        values += [point["recall"], point["specificity"]]
    return values


def compare(labels, probs, thresholds, points, n_resamples, seed):
    """One row per run: ROC-AUC, difference from run 0, recall and specificity at each of its
    points, each with a 95% interval from resampling the images (the same resamples for all runs)."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_resamples):
        pick = rng.integers(0, len(labels), len(labels))
        if labels[pick].min() == labels[pick].max():
            continue
        first = scores(labels[pick], probs[0][pick], thresholds[0])
        samples.append([scores(labels[pick], p[pick], t, first[0]) for p, t in zip(probs, thresholds)])
    low, high = np.percentile(np.array(samples), [2.5, 97.5], axis=0)  # runs x values
    names = ["roc_auc", "roc_auc_minus_first"] + [f"{kind}_{point}" for point in points
                                                  for kind in ("recall", "specificity")]
    reference_auc = ranking_metrics(labels, probs[0])["roc_auc"]
    rows = []
    for k, (p, t) in enumerate(zip(probs, thresholds)):
        row = {}
        for j, (name, value) in enumerate(zip(names, scores(labels, p, t, reference_auc))):
            row.update({name: value, f"{name}_lo": low[k, j], f"{name}_hi": high[k, j]})
        rows.append(row)
    return rows


def markdown(table, runs, points):
    header = "".join(f" recall at {point} | specificity there |" for point in points)
    lines = [f"Reference for the differences: `{runs[0]}`. Intervals: 95% bootstrap over images, paired across "
             "runs.", "", "| data | images (malignant) | run | ROC-AUC | difference from reference |" + header,
             "|---|---|---|---|---|" + "---|---|" * len(points)]

    def cell(row, name):
        return f"{row[name]:.3f} ({row[name + '_lo']:.3f} to {row[name + '_hi']:.3f})"
    for row in table.to_dict("records"):
        difference = "reference" if row["run"] == str(runs[0]) else cell(row, "roc_auc_minus_first")
        at_points = "".join(f" {cell(row, 'recall_' + point)} | {cell(row, 'specificity_' + point)} |"
                            for point in points)
        lines.append(f"| {row['data']} | {row['images']} ({row['malignant']}) | {Path(row['run']).name} | "
                     f"{cell(row, 'roc_auc')} | {difference} |" + at_points)
    return "\n".join(lines) + "\n"


@one_line_errors
def main(args):
    chosen = [read_thresholds(run) for run in args.runs]
    for run, run_points in zip(args.runs, chosen):
        if "recall_target" not in run_points:
            fail(run / "thresholds.json", "has no recall_target threshold; run threshold.py")
    points = [point for point in POINTS if all(point in c for c in chosen)]
    thresholds = [[c[point] for point in points] for c in chosen]
    datasets = {"val_probs.csv": "validation (HAM10000, lesion-level)"}
    sets = {**EXTERNAL, **(TEST_READS if args.test_reads else {})}
    datasets.update({f"{folder}/test_probs.csv": name for folder, name in sets.items()
                     if all((run / folder / "test_probs.csv").is_file() for run in args.runs)})
    rows = []
    for relative, name in datasets.items():
        labels, probs = paired_probs(args.runs, relative)
        for run, t, row in zip(args.runs, thresholds, compare(labels, probs, thresholds, points, args.bootstrap,
                                                              args.seed)):
            rows.append({"data": name, "images": len(labels), "malignant": int(labels.sum()), "run": str(run),
                         **{f"threshold_{point}": value for point, value in zip(points, t)}, **row})
    table = pd.DataFrame(rows)
    write_table_and_markdown(table, markdown(table, args.runs, points), args.out)
    print(f"wrote {args.out.with_suffix('.csv')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main(parse_args())
