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
mask_ok, for 7-class models prob_<dx> per class,
and with --overlay DIR the name of each image's PNG there (lesion outline and decision; numbered
where images in different folders share a name). Unreadable files, and images too small or too
narrow to hold a lesion, are reported by name and skipped. The output folders are checked for
writing before any image is read. A model trained with --metadata also reads --age, --sex and
--site (the same for every image given); without them it scores the image alone.

Examples: python predict.py photos/ --overlay overlays/
          python predict.py --run runs/lite0 photos/lesion1.jpg --operating-point best_f1 --age 60 --site back
"""
import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from common import (ArgumentParser, DX_CODES, IMAGE_SUFFIXES, REFERENCE_MODEL, SEXES, SITES, check_writable,
                    chosen_with_tta, cleaned_image, default_operating_point, ensemble_probs, fail, load_run_models,
                    loaded_segmenter, metadata_features, number_in, pick_device, prepare_cleaned, preprocess_settings,
                    preprocessing_differences, read_rgb, read_thresholds, shown, write_csv, write_png)


BATCH = 8  # images segmented and classified together; on 2 CPU cores 8 ran faster than 4, 16 or 32


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("images", nargs="+", type=Path, help="image files or folders of images")
    p.add_argument("--run", type=Path,
                   help="run or model folder with model.pt (or members.json) and thresholds.json "
                        "(default: the reference model, models/reference)")
    p.add_argument("--operating-point",
                   help="a threshold name in thresholds.json (default recall_bound where it has one; "
                        "best_f1, recall_target, default...)")
    p.add_argument("--out", type=Path,
                   help="CSV to write (default <run>/predictions.csv; predictions.csv here for the reference model)")
    p.add_argument("--overlay", type=Path, metavar="DIR", help="write a PNG per image with outline and decision")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction,
                   help="average over flips and rotations (default: as the thresholds were chosen)")
    p.add_argument("--age", type=number_in(float, 0, 120), help="patient's age, for models trained with --metadata")
    p.add_argument("--sex", choices=SEXES, help="patient's sex, for models trained with --metadata")
    p.add_argument("--site", choices=SITES, metavar="SITE",
                   help=f"anatomical site, for models trained with --metadata: {', '.join(SITES)}")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    return p.parse_args(argv)


def list_images(paths):
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            files.append(path)
        else:
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


def overlay(path, prepared, decision, prob, out_path):
    """The image with the lesion outline (red: malignant, green: benign) and the decision."""
    import cv2
    rgb = read_rgb(path)
    mask = cv2.resize(prepared["mask"], rgb.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    colour = {"malignant": (220, 40, 40), "benign": (40, 180, 40)}.get(decision, (230, 200, 40))
    thickness = max(2, rgb.shape[1] // 200)
    cv2.drawContours(rgb, contours, -1, colour, thickness)
    text = f"{decision} (p={prob:.2f})"
    scale = rgb.shape[1] / 800
    cv2.putText(rgb, text, (10, int(40 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                thickness + 2)
    cv2.putText(rgb, text, (10, int(40 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness)
    write_png(out_path, rgb)


def prepared_settings(models, run):
    """The one preprocessing every model of the run was trained with."""
    settings = [checkpoint.get("preprocess") for _, checkpoint in models]
    if None in settings:
        fail(run, "a model has no preprocessing settings; retrain it with this version of train.py")
    settings = [preprocess_settings(s) for s in settings]
    if any(preprocessing_differences(s, settings[0]) for s in settings):
        fail(run, "its models were trained on differently preprocessed images; predict with each on its own")
    if settings[0]["segmenter"] is not None:  # missing or changed: one line now, not a skip per image
        loaded_segmenter(settings[0]["segmenter"], settings[0]["segmenter_sha256"])
    return settings[0]


def print_table(rows, limit=20):
    """The first `limit` predictions as a table on the terminal; the CSV holds them all."""
    width = min(60, max(len(row["file"]) for row in rows))
    print(f"{'file':{width}s}  probability  decision")
    for row in rows[:limit]:
        name = row["file"] if len(row["file"]) <= width else "..." + row["file"][-width + 3:]
        print(f"{name:{width}s}  {row['malignancy_prob']:11.3f}  {row['decision']}")
    if len(rows) > limit:
        print(f"... and {len(rows) - limit} more")


def main(args):
    started = time.time()
    device = pick_device(args.device)
    run = args.run or REFERENCE_MODEL
    models = load_run_models(run, device)
    settings = prepared_settings(models, run)
    thresholds = read_thresholds(run)
    operating_point = args.operating_point or default_operating_point(thresholds)
    if operating_point not in thresholds:
        fail(run / "thresholds.json", f"has no operating point '{operating_point}' "
             f"(it has {', '.join(thresholds) or 'none'})")
    threshold = thresholds[operating_point]
    tta = chosen_with_tta(run) if args.tta is None else args.tta
    out = args.out or (run / "predictions.csv" if args.run else Path("predictions.csv"))
    for folder in [out.parent] + ([args.overlay] if args.overlay else []):
        check_writable(folder)  # before the work, not after it
    files = list_images(args.images)
    if not files:
        fail(" ".join(map(shown, args.images)), "no images found")

    metadata = metadata_features(pd.DataFrame({"age": [args.age], "sex": [args.sex], "localization": [args.site]}))
    rows, skipped, first_image = [], 0, time.time()
    progress = tqdm(total=len(files), desc="predicting")
    named = list(zip(files, overlay_names(files)))
    for start in range(0, len(named), BATCH):  # images are read one by one, segmented and classified a batch at a time
        batch, cleaned = [], []
        for path, overlay_name in named[start:start + BATCH]:
            try:
                cleaned.append(cleaned_image(path, settings["work_size"], settings["hair_removal"]))
                batch.append((path, overlay_name))
            except SystemExit as e:  # unreadable or degenerate: say which and go on with the rest
                tqdm.write(f"skipped {str(e).removeprefix('error: ')}")
                skipped += 1
        if not batch:
            progress.update(len(named[start:start + BATCH]))
            continue
        prepared_batch = prepare_cleaned(cleaned, settings["img_size"], settings["crop_margin"], settings["segmenter"],
                                         settings["segmenter_sha256"], settings["colour_constancy"])
        batch = [(path, overlay_name, prepared) for (path, overlay_name), prepared in zip(batch, prepared_batch)]
        arrays = {name: np.stack([prepared[key] for _, _, prepared in batch])
                  for name, key in (("full", "image"), ("crop", "crop"), ("mask", "mask_small"))}
        probs, class_probs = ensemble_probs(models, arrays, np.arange(len(batch)), device, tta=tta,
                                            metadata=np.repeat(metadata, len(batch), axis=0))
        for k, (path, overlay_name, prepared) in enumerate(batch):
            decision = "malignant" if probs[k] >= threshold else "benign"
            # no plausible lesion (a blank image, a photo of something else): the model's score is no diagnosis
            row = {"file": shown(path), "malignancy_prob": float(probs[k]),
                   "decision": decision if prepared["mask_ok"] else "no lesion found",
                   "threshold": threshold, "operating_point": operating_point, "tta": int(tta),
                   "mask_area": prepared["mask_area"], "mask_ok": prepared["mask_ok"]}
            if class_probs is not None:
                row.update({f"prob_{code}": float(class_probs[k, j]) for j, code in enumerate(DX_CODES)})
            if args.overlay:
                row["overlay"] = overlay_name
                overlay(path, prepared, row["decision"], probs[k], args.overlay / overlay_name)
            rows.append(row)
        progress.update(len(named[start:start + BATCH]))
    progress.close()
    seconds = time.time() - first_image
    if not rows:
        fail(" ".join(map(shown, args.images)), "none of the images could be read")
    write_csv(pd.DataFrame(rows), out)
    print_table(rows)
    print(f"{operating_point} threshold {threshold:.3f}{' (test-time augmentation)' if tta else ''}; "
          f"model {shown(run)}")
    print(f"wrote {shown(out)}: {len(rows)} images" + (f", {skipped} skipped" if skipped else "") +
          f", {len(rows) / max(seconds, 1e-9):.1f} images/s; {time.time() - started:.1f} s in all")


if __name__ == "__main__":
    main(parse_args())
