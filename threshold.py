"""Step 4: choose operating points on the validation set, and only there.

Reads <run>/val_probs.csv (label, prob; --probs for another file of validation probabilities,
such as evaluate.py --split val --tta's, when the model is to be read with test-time
augmentation; its tta column says so). Writes <run>/thresholds.json:
  default          0.5
  best_f1          the threshold of highest validation F1 on the precision-recall curve
  recall_target    the highest threshold whose validation recall is >= --target-recall
  recall_bound     the highest threshold whose validation recall has a lower 95% bound >= the target
                   (2.5th percentile over --bootstrap resamples of the malignant lesions): a point
                   whose recall holds on new images, where recall_target's falls short about half
                   the time
  specificity_target   with --target-specificity: the lowest threshold whose validation
                   specificity is >= the target (the most sensitive point that keeps it)
With --class-biases, also "class_biases": seven class-logit biases chosen on <run>/val_probs.csv
(train.py's plain probabilities, whatever --probs names) to maximise the top class's balanced
accuracy (docs/fourth_edition.md, JPB); the model folder applies them to every class answer.
Beside them "tta": whether the probabilities were test-time-augmented, so that evaluate.py and
predict.py read images the same way by default, and <run>/pr_curve_val.png with the chosen points
marked. It never opens test data.

Example: python threshold.py --run runs/lite0 --target-recall 0.90
"""
from pathlib import Path

import numpy as np

from common import (CLASS_COLUMNS, DX_CODES, ArgumentParser, best_f1_threshold, binary_metrics, chosen_class_biases,
                    fail, number_in, one_line_errors, plot_pr_curve, read_probs, recall_bound_threshold,
                    recall_target_threshold, specificity_target_threshold, top_class_balanced_accuracy,
                    with_class_biases, write_json)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--run", type=Path, required=True, help="model folder with val_probs.csv")
    p.add_argument("--probs", type=Path, help="validation probabilities to choose on (default <run>/val_probs.csv)")
    p.add_argument("--target-recall", type=number_in(float, 0, 1, low_open=True), default=0.90,
                   help="recall the screening point must reach, in (0, 1]")
    p.add_argument("--target-specificity", type=number_in(float, 0, 1, low_open=True),
                   help="also choose a point of at least this specificity, in (0, 1]")
    p.add_argument("--class-biases", action="store_true",
                   help="also choose the class-logit biases that maximise the top class's validation balanced "
                        "accuracy (a network with class probabilities: --task joint or multiclass)")
    p.add_argument("--bootstrap", type=number_in(int, 100), default=2000,
                   help="resamples of the malignant lesions for recall_bound")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    return p.parse_args(argv)


@one_line_errors
def main(args):
    val_path = args.probs or args.run / "val_probs.csv"
    val = read_probs(val_path)
    if args.probs is not None:  # thresholds come from validation images only, whatever file holds them
        own = read_probs(args.run / "val_probs.csv", ("image_id", "label", "prob"))
        if "image_id" not in val or set(val["image_id"]) != set(own["image_id"]):
            fail(val_path, f"does not hold the validation images of {args.run / 'val_probs.csv'}")
    labels, probs = val["label"].to_numpy(), val["prob"].to_numpy()
    views = set(val["tta"]) if "tta" in val else {0}  # train.py's val_probs.csv: plain probabilities
    if not views <= {0, 1} or len(views) > 1:
        fail(val_path, "column tta must be 0 or 1, the same on every line (evaluate.py writes it)")
    # without lesion ids (an older file) every image counts as a lesion of its own
    lesion_ids = (val["lesion_id"] if "lesion_id" in val else val.index).astype(str).to_numpy()
    if not set(np.unique(labels)) == {0, 1}:
        fail(val_path, "needs both benign (0) and malignant (1) labels to choose thresholds")
    thresholds = {
        "default": 0.5,
        "best_f1": best_f1_threshold(labels, probs),
        "recall_target": recall_target_threshold(labels, probs, args.target_recall),
        "recall_bound": recall_bound_threshold(labels, probs, lesion_ids, args.target_recall, args.bootstrap,
                                               args.seed),
    }
    if args.target_specificity is not None:
        thresholds["specificity_target"] = specificity_target_threshold(labels, probs, args.target_specificity)
    summary = {name: binary_metrics(labels, probs, t) for name, t in thresholds.items()}
    points = {"thresholds": thresholds, "tta": bool(views.pop()), "target_recall": args.target_recall,
              "target_specificity": args.target_specificity, "chosen_on": str(val_path), "validation_metrics": summary}
    if args.class_biases:
        points.update(chosen_biases(args.run / "val_probs.csv"))
    write_json(points, args.run / "thresholds.json")
    plot_pr_curve(labels, probs, thresholds, args.run / "pr_curve_val.png", "validation precision-recall")
    for name, m in summary.items():
        print(f"{name:14s} threshold {m['threshold']:.4f}  val recall {m['recall']:.3f}  "
              f"precision {m['precision']:.3f}  specificity {m['specificity']:.3f}")
    if args.class_biases:
        biases, accuracy = points["class_biases"], points["class_balanced_accuracy"]
        print(f"class biases   {' '.join(f'{code} {b:+.1f}' for code, b in biases.items())}  val balanced accuracy "
              f"{accuracy['without']:.3f} -> {accuracy['with']:.3f}")
    print(f"wrote {args.run / 'thresholds.json'}")


def chosen_biases(path):
    """thresholds.json's class_biases, chosen on a validation file's class probabilities, and the
    top class's balanced accuracy there without and with them."""
    val = read_probs(path, ("dx", *CLASS_COLUMNS))
    unknown = sorted(set(val["dx"]) - set(DX_CODES))
    if unknown:
        fail(path, f"column dx holds {unknown[0]!r}, not one of {', '.join(DX_CODES)}")
    dx, class_probs = val["dx"].to_numpy(), val[CLASS_COLUMNS].to_numpy()
    biases = chosen_class_biases(dx, class_probs)
    present = [code for code in DX_CODES if (dx == code).any()]
    return {"class_biases": {code: float(b) for code, b in zip(DX_CODES, biases)},
            "class_biases_chosen_on": str(path),
            "class_balanced_accuracy": {
                "without": top_class_balanced_accuracy(dx, class_probs, present),
                "with": top_class_balanced_accuracy(dx, with_class_biases(class_probs, biases), present)}}


if __name__ == "__main__":
    main(parse_args())
