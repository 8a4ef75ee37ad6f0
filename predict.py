"""Apply a trained model to new images: the same hair removal, segmentation and input form the
model was trained with, then the malignancy probability and the decision at an operating point.

Reads <run>/model.pt (for an ensemble of ensemble.py, every member's) and <run>/thresholds.json,
and images (files or folders of them). Without --run: the reference model that ships with the
toolkit, models/reference (its MODEL_CARD.md says what it is and what it is not).
Images are read as the thresholds were chosen: with test-time augmentation where thresholds.json
says so (--tta / --no-tta override it), at recall_bound where it has that point.
Prints a table (file, probability, decision) and writes a CSV (default <run>/predictions.csv, or
predictions.csv in the current folder for the reference model): file, malignancy_prob, decision
(benign/malignant at the chosen threshold, or "no lesion found" where no plausible lesion was
found: the whole image was scored, and mask_ok is 0), threshold, operating_point, tta, mask_area,
mask_ok; where the model gives the 7 classes (a 7-class or joint run, as the reference model is, or
a model folder with classes.pt), top_class and top_class_prob (the most likely class, also printed beside
malignancy and named on the overlay), answers_agree (1 where the class is malignant exactly where the
decision is; 0 where the two answers disagree, which the table says beside the answer) and prob_<dx>
for each of the seven, and with --clinic NAME (a site calibration written by
calibrate.py) model_prob: the site's thresholds then apply to the model's probability, model_prob,
and malignancy_prob is the site's recalibrated one. With --overlay DIR the name of each image's PNG there (lesion outline and decision; numbered
where images in different folders share a name). Unreadable files, and images too small or too
narrow to hold a lesion, are reported by name and skipped. The output folders are checked for
writing before any image is read. A model trained with --metadata also reads --age, --sex and
--site (the same for every image given); without them it scores the image alone.

Examples: python predict.py photos/ --overlay overlays/
          python predict.py --run runs/lite0 photos/lesion1.jpg --operating-point best_f1 --age 60 --site back
          python predict.py photos/ --clinic ph2
"""
import argparse
import time
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from common import (ENGINES, REFERENCE_MODEL, SEXES, SITES, ArgumentParser, ModelFolder, ToolkitError, check_writable,
                    disagreement, fail, image_files, number_in, one_line_errors, overlay_image, patient_metadata,
                    prediction_row, read_rgb, shown, write_csv, write_png)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("images", nargs="+", type=Path, help="image files or folders of images")
    p.add_argument("--run", type=Path,
                   help="model folder with model.pt (or members.json) and thresholds.json "
                        "(default: the reference model, models/reference)")
    p.add_argument("--operating-point",
                   help="a threshold name in thresholds.json (default recall_bound where it has one; "
                        "best_f1, recall_target, default...)")
    p.add_argument("--out", type=Path,
                   help="CSV to write (default <run>/predictions.csv; predictions.csv here for the reference model)")
    p.add_argument("--overlay", type=Path, metavar="DIR", help="write a PNG per image with outline and decision")
    p.add_argument("--clinic", metavar="NAME",
                   help="a site calibration of the run (calibrate.py, <run>/clinics/NAME): its operating points, "
                        "and its recalibrated probability as malignancy_prob (the model's own in model_prob)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction,
                   help="average over flips and rotations (default: as the thresholds were chosen)")
    p.add_argument("--age", type=number_in(float, 0, 120), help="patient's age, for models trained with --metadata")
    p.add_argument("--sex", choices=SEXES, help="patient's sex, for models trained with --metadata")
    p.add_argument("--site", choices=SITES, metavar="SITE",
                   help=f"anatomical site, for models trained with --metadata: {', '.join(SITES)}")
    p.add_argument("--classes", action="store_true",
                   help="require the 7 class probabilities: a model without them ends with one line saying so "
                        "(without the flag such a model gives malignancy alone)")
    p.add_argument("--engine", choices=ENGINES,
                   help="onnx: ONNX Runtime (a model folder's ONNX files, export_model.py --onnx); torch: PyTorch "
                        "(default: onnx where the folder has them, as models/reference has after make setup)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    return p.parse_args(argv)


def list_images(paths):
    files, missing = image_files(paths)
    for path in missing:
        print(f"skipped {shown(path)}: file not found")
    return files


def overlay_names(files):
    """An overlay file name per image: its stem, numbered where images in different folders share
    one, so no overlay overwrites another."""
    names, seen = [], {}
    for path in files:
        stem = shown(path.stem)
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.png" if seen[stem] == 1 else f"{stem}_{seen[stem]}.png")
    return names


def print_table(rows, limit=20):
    """The first `limit` predictions as a table on the terminal; the CSV holds them all."""
    width = min(60, max(len(row["file"]) for row in rows))
    classes = "top_class" in rows[0]
    print(f"{'file':{width}s}  probability  {'decision':15s}" + ("  most likely class" if classes else ""))
    for row in rows[:limit]:
        name = row["file"] if len(row["file"]) <= width else "..." + row["file"][-width + 3:]
        differ = disagreement(row)
        print(f"{name:{width}s}  {row['malignancy_prob']:11.3f}  {row['decision']:15s}" +
              (f"  {row['top_class']} {row['top_class_prob']:.2f}" if classes else "") +
              (f"  <- disagree: {differ}" if differ else ""))
    if len(rows) > limit:
        print(f"... and {len(rows) - limit} more")
    differing = sum(1 for row in rows if disagreement(row))
    if differing:
        print(f"{differing} of {len(rows)} images: the most likely class and the malignancy decision disagree "
              "(answers_agree 0 in the CSV); the decision, at its validated operating point, is the answer to read")


@one_line_errors
def main(args):
    started = time.time()
    model = ModelFolder(args.run or REFERENCE_MODEL, args.clinic, args.engine, args.device)  # its small files
    operating_point, threshold = model.points.threshold(args.operating_point)
    tta = model.points.tta if args.tta is None else args.tta
    out = args.out or (model.path / "predictions.csv" if args.run else Path("predictions.csv"))
    for folder in [out.parent] + ([args.overlay] if args.overlay else []):
        check_writable(folder)  # before the work, not after it
    files = list_images(args.images)
    if not files:
        fail(" ".join(map(shown, args.images)), "no images found")

    model.load()  # its networks: torch's import, where PyTorch runs them, and the weights
    if args.classes:
        model.require_classes()
    metadata = patient_metadata(args.age, args.sex, args.site, len(files))
    rows, skipped, first_image = [], 0, time.time()
    names = overlay_names(files)
    for i, result in tqdm(model.classify(files, metadata, tta), total=len(files), desc="predicting"):
        if isinstance(result, ToolkitError):  # unreadable or degenerate: say which and go on with the rest
            tqdm.write(f"skipped {result}")
            skipped += 1
            continue
        row = prediction_row(shown(files[i]), result, threshold, operating_point, tta, model.points.calibration)
        if args.overlay:
            row["overlay"] = names[i]
            write_png(args.overlay / names[i], overlay_image(read_rgb(files[i]), result["prepared"], row["decision"],
                                                             result["prob"], row.get("top_class")))
        rows.append(row)
    seconds = time.time() - first_image
    if not rows:
        fail(" ".join(map(shown, args.images)), "none of the images could be read")
    write_csv(pd.DataFrame(rows), out)
    print_table(rows)
    print(f"{operating_point} threshold {threshold:.3f}{' (test-time augmentation)' if tta else ''}; "
          f"model {shown(model.path)} ({'ONNX Runtime' if model.engine == 'onnx' else 'PyTorch'})" +
          (f"; calibrated to clinic {args.clinic} (the threshold applies to model_prob)"
                                   if args.clinic else ""))
    print(f"wrote {shown(out)}: {len(rows)} images" + (f", {skipped} skipped" if skipped else "") +
          f", {len(rows) / max(seconds, 1e-9):.1f} images/s; {time.time() - started:.1f} s in all")

if __name__ == "__main__":
    main(parse_args())
