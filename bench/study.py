"""Collect the study's runs into one results table (docs/first_edition.md).

Reads every model folder under --runs (config.json, history.csv, thresholds.json, metrics.csv, and
ph2/metrics.csv and multiclass_metrics.csv where present; for an ensemble of ensemble.py its
members.json, and its members' training time, which is its cost). Writes <out>.csv (one row per stage,
data set and operating point, with 95% intervals) and <out>.md (the table for docs/first_edition.md), and
prints the Markdown.

Stage 5 of the study, "the best of the above", is chosen among the binary runs (ensembles
included) by validation ROC-AUC alone (never by a test figure) and reported at its best_f1 and
recall_target points; the 7-class model likewise among the multiclass runs by validation balanced
accuracy. With --plots DIR, the binary choice's plots (internal test and PH2) and the 7-class
choice's confusion matrix are copied there.

Example: python bench/study.py --runs runs/study --out bench/results/study --plots docs/results
"""
import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import ENSEMBLE_FILE, fail, one_line_errors, write_table_and_markdown  # noqa: E402

CONFUSION_7 = "confusion_matrix_7class.png"
BINARY_PLOTS = ("roc_curve.png", "pr_curve.png", "confusion_matrix.png", "calibration.png", "pr_curve_val.png")
PH2_PLOTS = ("roc_curve.png", "confusion_matrix.png")
METRICS = ("roc_auc", "pr_auc", "accuracy", "precision", "recall", "specificity", "f1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=Path("runs/study"), help="folder of the study's model folders")
    p.add_argument("--out", type=Path, default=Path("bench/results/study"), help="output path without suffix")
    p.add_argument("--plots", type=Path, help="copy the plots of the run best by validation into this folder")
    return p.parse_args(argv)


def describe(run):
    if (run / ENSEMBLE_FILE).is_file():
        ensemble = json.loads((run / ENSEMBLE_FILE).read_text())
        members = [describe(run / member) for member in ensemble["members"]]
        recipes = {k: "/".join(sorted({m[k] for m in members})) for k in ("loss", "aug", "input")}
        return {"stage": run.name, "arch": "mean of stages " + ", ".join(m["stage"].split("_")[0] for m in members),
                "task": ensemble["task"], **recipes,
                "epochs": sum(m["epochs"] for m in members),
                "train_minutes": round(sum(m["train_minutes"] for m in members), 1), "val_score": ensemble["val_score"]}
    config = json.loads((run / "config.json").read_text())
    history = pd.read_csv(run / "history.csv")
    a = config["args"]
    return {"stage": run.name, "arch": a["arch"] + ("" if a["pretrained"] else " (scratch)"), "task": a["task"],
            "loss": a["loss"], "aug": a["aug"], "input": a["input"], "epochs": len(history),
            "train_minutes": round(history["seconds"].sum() / 60, 1), "val_score": config["best_val_score"]}


def evaluated_runs(runs_dir):
    # in stage order: 2 before 10, 4a before 4b
    runs = sorted((p.parent for p in runs_dir.glob("*/metrics.csv")),
                  key=lambda run: (int(re.match(r"\d*", run.name).group() or 10**9), run.name))
    if not runs:
        fail(runs_dir, "holds no evaluated run (no */metrics.csv)")
    return runs


def best_run(infos, task):
    """The run of this task with the highest validation score: ROC-AUC for binary runs, balanced
    accuracy for multiclass ones (the two are not comparable)."""
    runs = [info for info in infos if info["task"] == task]
    return max(runs, key=lambda info: info["val_score"])["stage"] if runs else None


def operating_points(stage, best):
    if stage == best:
        return ["best_f1", "recall_target"]
    # the reference study read its baseline at 0.5 and tuned the threshold later
    return ["default", "recall_target"] if stage == "1_baseline" else ["recall_target"]


def balanced_accuracy_7(folder):
    """The 7-class balanced accuracy (macro recall) and its interval from an evaluation folder's
    multiclass_metrics.csv, or {} where the model is binary."""
    if not (folder / "multiclass_metrics.csv").is_file():
        return {}
    macro = pd.read_csv(folder / "multiclass_metrics.csv").set_index("class").loc["macro"]
    return {"balanced_accuracy_7": macro["recall"], "balanced_accuracy_7_lo": macro.get("recall_lo", float("nan")),
            "balanced_accuracy_7_hi": macro.get("recall_hi", float("nan"))}


def collect(runs, infos, best, best_multiclass):
    rows = []
    for run, info in zip(runs, infos):
        for data, path in (("internal test", run / "metrics.csv"), ("PH2", run / "ph2" / "metrics.csv")):
            if not path.is_file():
                continue
            table = pd.read_csv(path).set_index("operating_point")
            for point in operating_points(info["stage"], best):
                row = {**info, "data": data, "operating_point": point, "threshold": table.loc[point, "threshold"],
                       "best_by_validation": info["stage"] in (best, best_multiclass)}
                for m in METRICS:
                    row.update({m: table.loc[point, m], f"{m}_lo": table.loc[point, f"{m}_lo"],
                                f"{m}_hi": table.loc[point, f"{m}_hi"]})
                if data == "internal test":
                    row.update(balanced_accuracy_7(run))
                rows.append(row)
    return pd.DataFrame(rows)


def markdown(table):
    head = ["stage", "data", "point", "ROC-AUC", "PR-AUC", "accuracy", "precision", "recall", "specificity", "F1",
            "train min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.to_dict("records"):
        stage = r["stage"] + (" (best by val)" if r["best_by_validation"] else "")
        if r["arch"].startswith("mean of"):
            stage += f", {r['arch']}"
        if pd.notna(r.get("balanced_accuracy_7")):
            stage += f", 7-class bal. acc. {r['balanced_accuracy_7']:.3f}"
            if pd.notna(r.get("balanced_accuracy_7_lo")):
                stage += f" ({r['balanced_accuracy_7_lo']:.3f}-{r['balanced_accuracy_7_hi']:.3f})"
        cells = [f"{r[m]:.3f} ({r[m + '_lo']:.3f}-{r[m + '_hi']:.3f})" for m in METRICS]
        lines.append(f"| {stage} | {r['data']} | {r['operating_point']} (t={r['threshold']:.3f}) | "
                     + " | ".join(cells) + f" | {r['train_minutes']} |")
    return "\n".join(lines) + "\n"


def copy_plots(sources, out_dir):
    """Copy each (file, new name) pair whose file exists into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for source, name in sources:
        if source.is_file():
            shutil.copyfile(source, out_dir / name)


@one_line_errors
def main(args):
    runs = evaluated_runs(args.runs)
    infos = [describe(run) for run in runs]
    best, best_multiclass = best_run(infos, "binary"), best_run(infos, "multiclass")
    table = collect(runs, infos, best, best_multiclass)
    write_table_and_markdown(table, markdown(table), args.out)
    if args.plots and best is not None:
        run = args.runs / best
        copy_plots([(run / name, name) for name in BINARY_PLOTS]
                   + [(run / "ph2" / name, f"ph2_{name}") for name in PH2_PLOTS], args.plots)
        print(f"copied the plots of {best} (best by validation ROC-AUC) into {args.plots}")
    if args.plots and best_multiclass is not None:
        copy_plots([(args.runs / best_multiclass / CONFUSION_7, CONFUSION_7)], args.plots)
        print(f"copied the 7-class confusion matrix of {best_multiclass} (best by validation) into {args.plots}")


if __name__ == "__main__":
    main(parse_args())
