"""Step 3b (optional): combine trained runs into one ensemble whose probability is their mean.

Models trained with other losses, input forms or seeds err on different images, so the mean of
their probabilities ranks better than any one of them. Choose the members on validation only.

Reads each member run's val_probs.csv (and checks that its model.pt exists). Writes into --run-dir:
  members.json    the member model folders (relative to the ensemble folder), the task, each
                  member's validation score and the ensemble's (ROC-AUC for binary runs, balanced
                  accuracy over the 7 classes for multiclass runs)
  val_probs.csv   the members' mean validation probabilities (prob, and prob_<dx> for 7-class runs)
threshold.py, evaluate.py and predict.py take the ensemble folder as --run like any model folder:
evaluate.py and predict.py run every member's model and average their probabilities.

Example: python ensemble.py --run-dir runs/ensemble runs/lite0_full runs/lite0_crop runs/lite0_masked
"""
import os
from pathlib import Path

import numpy as np

from common import (CLASS_COLUMNS, ENSEMBLE_FILE, ArgumentParser, balanced_accuracy_7, fail, lock_output,
                    one_line_errors, ranking_metrics, read_json, read_probs, write_csv, write_json)

KEYS = ["image_id", "lesion_id", "dx", "label"]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("members", nargs="+", type=Path, help="model folders written by train.py")
    p.add_argument("--run-dir", type=Path, required=True, help="folder for the ensemble")
    return p.parse_args(argv)


def member_task(run):
    if (run / ENSEMBLE_FILE).is_file():
        fail(run, "is an ensemble itself; list its members instead")
    if not (run / "model.pt").is_file():
        fail(run / "model.pt", "not found; a member needs its model for evaluate.py and predict.py")
    task = read_json(run / "config.json").get("args", {}).get("task")
    if task not in ("binary", "multiclass"):
        fail(run / "config.json", "names no task; was it written by train.py?")
    return task


def read_val_probs(run, task):
    columns = KEYS + ["prob"] + (CLASS_COLUMNS if task == "multiclass" else [])
    val = read_probs(run / "val_probs.csv", columns)
    return val[columns].sort_values("image_id").reset_index(drop=True)


def validation_score(val, task):
    if task == "multiclass":
        return balanced_accuracy_7(val["dx"], val[CLASS_COLUMNS].to_numpy())
    return ranking_metrics(val["label"], val["prob"])["roc_auc"]


@one_line_errors
def main(args):
    if len(set(map(os.path.abspath, args.members))) < 2:
        fail(" ".join(map(str, args.members)), "an ensemble needs at least two different runs")
    if os.path.abspath(args.run_dir) in map(os.path.abspath, args.members):
        fail(args.run_dir, "is one of the members; write the ensemble to a folder of its own")
    lock_output(args.run_dir)
    tasks = [member_task(run) for run in args.members]
    task = tasks[0]
    for run, other in zip(args.members[1:], tasks[1:]):
        if other != task:
            fail(run, f"is a {other} run but {args.members[0]} is {task}; an ensemble averages one task")
    members = [(run, read_val_probs(run, task)) for run in args.members]
    first_run, first = members[0]
    for run, val in members[1:]:
        if not val[KEYS].equals(first[KEYS]):
            fail(run / "val_probs.csv", f"holds other validation images or labels than {first_run}; "
                 "members must share the preprocess cache and split")

    mean = first.copy()
    value_columns = [c for c in first.columns if c.startswith("prob")]
    mean[value_columns] = np.mean([val[value_columns].to_numpy() for _, val in members], axis=0)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    scores = {str(run): validation_score(val, task) for run, val in members}
    summary = {"members": [os.path.relpath(run, args.run_dir) for run, _ in members], "task": task,
               "rule": "mean probability", "score": "roc_auc" if task == "binary" else "balanced_accuracy_7",
               "member_val_scores": scores, "val_score": validation_score(mean, task)}
    write_csv(mean, args.run_dir / "val_probs.csv")
    write_json(summary, args.run_dir / ENSEMBLE_FILE)
    for run, score in scores.items():
        print(f"{run:40s} validation {summary['score']} {score:.4f}")
    print(f"{'ensemble (mean)':40s} validation {summary['score']} {summary['val_score']:.4f}")
    print(f"wrote {args.run_dir / ENSEMBLE_FILE} and {args.run_dir / 'val_probs.csv'}")


if __name__ == "__main__":
    main(parse_args())
