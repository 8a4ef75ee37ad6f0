"""The reference model's two benchmarks (models/reference/MODEL_CARD.md).

Faithfulness: does the compact (fp16) folder reproduce the full-precision run? Given the run's
test-time-augmented validation probabilities and the compact folder's on the same images (each
through its own segmenter's cache), the ROC-AUC of both and the recall and specificity of both at
every operating point of thresholds.json, with the differences. With --full-class-probs (the 7-class
run exported as classes.pt, its test-time-augmented validation probabilities), the same for the seven
classes: balanced accuracy, macro ROC-AUC, melanoma recall and the largest class probability change.

Speed: predict.py end to end (read, hair removal, U-Net, crop, classifier) through its command line,
with and without test-time augmentation, on N HAM10000 images (outside the study's test split) and
on PH2's 100 images (765x573; their diagnoses are not read), as the images/s predict.py reports for
its loop, and the wall time of one call on one image, start-up included (median of 3).

Writes <out>.json and <out>.md.

Examples: python bench/reference_model.py --full-probs runs/F1/val_tta/test_probs.csv \\
              --compact-probs runs/F1/compact_val/test_probs.csv --out bench/results/reference_faithful
          python bench/reference_model.py --speed --n 500 --out bench/results/reference_speed
"""
import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import numpy as np  # noqa: E402

from common import (CLASS_COLUMNS, DX_CODES, REFERENCE_MODEL, atomic_path, binary_metrics, fail,  # noqa: E402
                    one_line_errors, ranking_metrics, read_probs, read_thresholds, write_json)
from seven_classes import figures as class_figures  # noqa: E402  (the recipe study's three figures)

SHARED = ROOT.parent / "shared" / "data"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REFERENCE_MODEL, help="the compact model folder")
    p.add_argument("--full-probs", type=Path, help="the full-precision run's validation probabilities")
    p.add_argument("--compact-probs", type=Path, help="the compact folder's, on the same images")
    p.add_argument("--full-class-probs", type=Path,
                   help="the 7-class run's validation probabilities, against --compact-probs' prob_<dx>")
    p.add_argument("--speed", action="store_true", help="time predict.py")
    p.add_argument("--n", type=int, default=500, help="HAM10000 images for the speed figure")
    p.add_argument("--out", type=Path, required=True, help="output prefix (.json and .md are added)")
    return p.parse_args(argv)


def faithfulness(full_path, compact_path, thresholds):
    full = read_probs(full_path, ("image_id", "label", "prob")).set_index("image_id")
    compact = read_probs(compact_path, ("image_id", "label", "prob")).set_index("image_id")
    if set(full.index) != set(compact.index):
        fail(compact_path, f"not the images of {full_path}")
    compact = compact.loc[full.index]
    rows = [{"point": "ROC-AUC", "full": ranking_metrics(full["label"], full["prob"])["roc_auc"],
             "compact": ranking_metrics(compact["label"], compact["prob"])["roc_auc"]}]
    for name, t in thresholds.items():
        a, b = binary_metrics(full["label"], full["prob"], t), binary_metrics(compact["label"], compact["prob"], t)
        for metric in ("recall", "specificity"):
            rows.append({"point": f"{name} {metric} (t={t:.4f})", "full": a[metric], "compact": b[metric]})
    for row in rows:
        row["difference"] = row["compact"] - row["full"]
    largest = float((compact["prob"] - full["prob"]).abs().max())
    return {"images": len(full), "malignant": int(full["label"].sum()), "rows": rows,
            "largest_probability_change": largest}


def class_faithfulness(full_path, compact_path):
    full = read_probs(full_path, ("image_id", "dx", *CLASS_COLUMNS)).set_index("image_id")
    compact = read_probs(compact_path, ("image_id", "dx", *CLASS_COLUMNS)).set_index("image_id")
    if set(full.index) != set(compact.index):
        fail(compact_path, f"not the images of {full_path}")
    compact = compact.loc[full.index]
    truth = np.array([DX_CODES.index(code) for code in full["dx"]])
    points = ("balanced accuracy", "macro ROC-AUC", "melanoma recall")
    a, b = class_figures(truth, full[CLASS_COLUMNS].to_numpy()), class_figures(truth, compact[CLASS_COLUMNS].to_numpy())
    largest = float(np.abs(compact[CLASS_COLUMNS].to_numpy() - full[CLASS_COLUMNS].to_numpy()).max())
    return {"images": len(full), "rows": [{"point": point, "full": x, "compact": y, "difference": y - x}
                                          for point, x, y in zip(points, a, b)],
            "largest_probability_change": largest}


def comparison_lines(heading, rows):
    """A faithfulness table in Markdown: each figure at full precision, compact and the difference."""
    return [heading, "", "| | full precision | compact | difference |", "|---|---|---|---|"] + \
        [f"| {r['point']} | {r['full']:.4f} | {r['compact']:.4f} | {r['difference']:+.4f} |" for r in rows]


def predict_run(files, *flags):
    """(images/s of predict.py's loop, wall seconds of the whole call)."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        out = subprocess.run([sys.executable, str(ROOT / "predict.py"), *map(str, files), "--out",
                              str(Path(tmp) / "p.csv"), *flags], capture_output=True, text=True)
        wall = time.time() - started
    if out.returncode:
        raise SystemExit(out.stderr.strip())
    rate = float(re.search(r"([\d.]+) images/s", out.stdout).group(1))
    return rate, wall


def speed(model, n):
    labels = pd.read_csv(SHARED / "ham10000_full" / "labels.csv")
    ham = [SHARED / "ham10000_full" / f for f in labels[labels["split"].isna()]["filename"].head(n)]
    ph2 = [SHARED / "ph2" / f for f in pd.read_csv(SHARED / "ph2" / "labels.csv")["filename"]]
    rows = []
    for name, files in ((f"HAM10000, {len(ham)} images (200x150)", ham), (f"PH2, {len(ph2)} images (765x573)", ph2)):
        for tta in ("--tta", "--no-tta"):
            rate, wall = predict_run(files, "--run", model, tta)
            rows.append({"images": name, "tta": tta == "--tta", "images_per_s": rate, "wall_s": round(wall, 1)})
            print(rows[-1])
    one = statistics.median(predict_run(ham[:1], "--run", model)[1] for _ in range(3))
    return {"rows": rows, "one_image_call_s": round(one, 2)}


@one_line_errors
def main(args):
    results, lines = {}, []
    if args.full_probs and args.compact_probs:
        f = faithfulness(args.full_probs, args.compact_probs, read_thresholds(args.model))
        results["faithfulness"] = f
        lines += comparison_lines(f"Compact ({args.compact_probs}) against full precision ({args.full_probs}): "
                                  f"{f['images']} validation images, {f['malignant']} malignant; largest probability "
                                  f"change {f['largest_probability_change']:.4f}", f["rows"])
    if args.full_class_probs and args.compact_probs:
        f = class_faithfulness(args.full_class_probs, args.compact_probs)
        results["class_faithfulness"] = f
        lines += [""] + comparison_lines(
            f"The seven classes, compact ({args.compact_probs}) against full precision ({args.full_class_probs}): "
            f"{f['images']} validation images; largest class probability change "
            f"{f['largest_probability_change']:.4f}", f["rows"])
    if args.speed:
        s = speed(args.model, args.n)
        results["speed"] = s
        lines += ["", "| images | test-time augmentation | images/s | wall s |", "|---|---|---|---|"]
        lines += [f"| {r['images']} | {'yes' if r['tta'] else 'no'} | {r['images_per_s']:.1f} | {r['wall_s']} |"
                  for r in s["rows"]]
        lines += ["", f"One predict.py call on one image, start-up included: {s['one_image_call_s']} s (median of 3)"]
    if not results:
        raise SystemExit("error: give --full-probs (or --full-class-probs) and --compact-probs, or --speed")
    write_json(results, args.out.with_suffix(".json"))
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(parse_args())
