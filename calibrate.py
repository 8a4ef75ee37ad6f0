"""Calibrate a trained run (or the reference model) to a site: a clinic's own labelled images set
its operating points and its probability of malignancy. Thresholds chosen on HAM10000 do not
transfer: at the reference model's recall_bound, PH2's melanomas were found 13 times in 20.

Reads a labelled dataset in fetch_data.py's layout (data/<site>/metadata.csv and its images:
`python fetch_data.py --from-dir CLINIC_FOLDER --out data/<site>`), all of its rows or those of
--split. Each image is prepared with the run's own preprocessing and read as the run's thresholds
were chosen (test-time augmentation where they say so; --tta / --no-tta override it), with the
age, sex and site of metadata.csv for a model trained with them (--hide-metadata: as if unknown,
for a site whose new images will come without them). Writes <run>/clinics/<name>/, whole or not at all:
  thresholds.json   operating points chosen on the site's images alone: recall_bound (the highest
                    threshold whose recall has a lower 95% bound at or above --target-recall: exact
                    binomial (Clopper-Pearson) over malignant images below 100 malignant lesions,
                    the lesion bootstrap from there on), recall_target, best_f1, default, and with
                    --target-specificity specificity_target; what the sample can support and warnings
  calibration.json  the site's recalibration of the model's probability: logistic regression on the
                    logit below 100 images of either class, isotonic regression from there on
  site_probs.csv    image_id, lesion_id, label, prob (the model's), calibrated_prob, tta
  reliability.png   the reliability diagram of the model's probability and of the recalibrated one,
                    with each one's Brier score and ECE
The thresholds apply to the model's probability (recalibration is monotone); `predict.py --clinic
NAME` and `evaluate.py --clinic NAME` use them and report the recalibrated probability. It cannot
fix a model that ranks the site's lesions poorly: the ROC-AUC it prints says how well it does.

Example: python fetch_data.py --from-dir ../shared/data/ph2 --out data/ph2 --assign-split test
         python calibrate.py --data data/ph2 --name ph2
"""
import argparse
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import (REFERENCE_MODEL, ArgumentParser, ModelFolder, ToolkitError, binary_metrics, calibration_errors,
                    check_names, clinic_dir, fail, fit_recalibration, hidden_metadata, lock_output, metadata_features,
                    number_in, one_line_errors, plot_reliability, ranking_metrics, read_csv, recalibrated,
                    replace_folder, shown, site_operating_points, unknown_sites_line, write_csv, write_json)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--data", type=Path, required=True, help="a dataset folder written by fetch_data.py")
    p.add_argument("--name", help="the site's name, a folder under <run>/clinics (default: the data folder's name)")
    p.add_argument("--run", type=Path, help="model folder (default: the reference model, models/reference)")
    p.add_argument("--split", nargs="+", help="only these splits of metadata.csv (default: every row)")
    p.add_argument("--target-recall", type=number_in(float, 0, 1, low_open=True), default=0.90,
                   help="recall the screening point must reach, in (0, 1]")
    p.add_argument("--target-specificity", type=number_in(float, 0, 1, low_open=True),
                   help="also choose a point of at least this specificity")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction,
                   help="average over flips and rotations (default: as the run's thresholds were chosen)")
    p.add_argument("--hide-metadata", action="store_true",
                   help="score the images without their age, sex and site, as new images that come without them")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    return p.parse_args(argv)


def site_rows(data_dir, splits):
    """metadata.csv's rows to calibrate on, with each image's path checked to lie in the folder."""
    rows = read_csv(data_dir / "metadata.csv", ("image_id", "filename", "malignant"))
    if splits:
        if "split" not in rows:
            fail(data_dir / "metadata.csv", "has no split column to choose --split from")
        rows = rows[rows["split"].isin(splits)]
    if rows.empty:
        fail(data_dir / "metadata.csv", "has no rows" + (f" in split {', '.join(splits)}" if splits else ""))
    if not set(rows["malignant"].unique()) <= {0, 1}:
        fail(data_dir / "metadata.csv", "column malignant must be 0 or 1")
    check_names(rows, data_dir / "metadata.csv")  # filenames become paths
    files = [data_dir / f for f in rows["filename"]]
    if "lesion_id" not in rows:  # every image a lesion of its own
        rows = rows.assign(lesion_id=rows["image_id"])
    return rows.reset_index(drop=True), files


@one_line_errors
def main(args):
    name = args.name or args.data.name
    model = ModelFolder(args.run or REFERENCE_MODEL, device=args.device)
    out = clinic_dir(model.path, name, must_exist=False)
    rows, files = site_rows(args.data, args.split)
    model.load()
    tta = model.points.tta if args.tta is None else args.tta
    lock_output(out)

    known = hidden_metadata(rows) if args.hide_metadata else rows
    unknown_line = unknown_sites_line(known, model.general_sites)  # train.py --general-sites: read as it trained
    if unknown_line and model.reads_metadata:
        print(unknown_line)
    probs = np.full(len(rows), np.nan)
    for i, result in tqdm(model.classify(files, metadata_features(known, model.general_sites), tta),
                          total=len(files), desc="predicting"):
        if isinstance(result, ToolkitError):
            tqdm.write(f"skipped {result}")
        else:
            probs[i] = result["prob"]
    scored = rows[~np.isnan(probs)].assign(prob=probs[~np.isnan(probs)])
    labels = scored["malignant"].to_numpy().astype(int)
    if len(set(labels)) < 2:
        fail(args.data / "metadata.csv", "needs benign and malignant images that can be read to calibrate on")

    thresholds, method, warnings = site_operating_points(labels, scored["prob"].to_numpy(), scored["lesion_id"],
                                                         args.target_recall, args.target_specificity)
    site_metrics = {point: binary_metrics(labels, scored["prob"], t) for point, t in thresholds.items()}
    calibration = fit_recalibration(labels, scored["prob"])
    scored["calibrated_prob"] = recalibrated(scored["prob"], calibration)
    before, after = (calibration_errors(labels, scored[c]) for c in ("prob", "calibrated_prob"))
    calibration.update({"fitted_on": len(scored), "brier_before": before[0], "ece_before": before[1],
                        "brier_after": after[0], "ece_after": after[1]})
    ranking = ranking_metrics(labels, scored["prob"])

    built = out.with_name(f".{out.name}.building")
    shutil.rmtree(built, ignore_errors=True)
    write_json({"thresholds": thresholds, "tta": tta, "target_recall": args.target_recall,
                "target_specificity": args.target_specificity, "recall_bound_method": method,
                "images": len(scored), "malignant": int(labels.sum()), "hide_metadata": args.hide_metadata,
                "chosen_on": str(args.data / "metadata.csv"), "splits": args.split, "site_roc_auc": ranking["roc_auc"],
                "warnings": warnings,
                "site_metrics": site_metrics},
               built / "thresholds.json")
    write_json(calibration, built / "calibration.json")
    columns = ["image_id", "lesion_id", "malignant", "prob", "calibrated_prob"]
    write_csv(scored[columns].rename(columns={"malignant": "label"}).assign(tta=int(tta)), built / "site_probs.csv")
    plot_reliability(labels, scored["prob"].to_numpy(), built / "reliability.png",
                     scored["calibrated_prob"].to_numpy())
    replace_folder(built, out)

    print(f"{len(scored)} images of {shown(args.data)} ({int(labels.sum())} malignant"
          + (f", {len(rows) - len(scored)} skipped" if len(scored) < len(rows) else "")
          + f"); the model ranks them at ROC-AUC {ranking['roc_auc']:.3f}")
    for point, m in site_metrics.items():
        print(f"{point:18s} threshold {m['threshold']:.4f}  site recall {m['recall']:.3f}  "
              f"specificity {m['specificity']:.3f}")
    print(f"recall_bound: {method}")
    print(f"recalibration ({calibration['method']}): Brier {before[0]:.3f} -> {after[0]:.3f}, "
          f"ECE {before[1]:.3f} -> {after[1]:.3f} (on these images)")
    for warning in warnings:
        print(f"warning: {warning}")
    print(f"wrote {shown(out)}; use it with predict.py --clinic {name}")


if __name__ == "__main__":
    main(parse_args())
