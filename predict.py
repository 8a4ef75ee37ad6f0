"""Apply a trained model to new images: the same hair removal, segmentation and input form the
model was trained with, then the malignancy probability and the decision at an operating point.

Reads <run>/model.pt (for an ensemble of ensemble.py, every member's) and <run>/thresholds.json,
and images (files or folders of them).
Writes a CSV (default <run>/predictions.csv): file, malignancy_prob, decision (benign/malignant at
the chosen threshold, or "no lesion found" where no plausible lesion was found: the whole image was
scored, and mask_ok is 0), threshold, mask_area, mask_ok, for 7-class models prob_<dx> per class,
and with --overlay DIR the name of each image's PNG there (lesion outline and decision; numbered
where images in different folders share a name). Unreadable files, and images too small or too
narrow to hold a lesion, are reported by name and skipped. The output folders are checked for
writing before any image is read. A model trained with --metadata also reads --age, --sex and
--site (the same for every image given); without them it scores the image alone.

Example: python predict.py --run runs/lite0 photos/ --operating-point recall_target --overlay overlays/
"""
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from common import (ArgumentParser, DX_CODES, IMAGE_SUFFIXES, SEXES, SITES, check_writable, ensemble_probs, fail,
                    load_run_models, loaded_segmenter, metadata_features, number_in, pick_device, preprocess_image,
                    preprocess_settings, read_rgb, read_thresholds, shown, write_csv, write_png)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("images", nargs="+", type=Path, help="image files or folders of images")
    p.add_argument("--run", type=Path, required=True,
                   help="run folder with model.pt (or members.json) and thresholds.json")
    p.add_argument("--operating-point", default="recall_target",
                   help="a threshold name in thresholds.json (default, best_f1, recall_target...)")
    p.add_argument("--out", type=Path, help="CSV to write (default <run>/predictions.csv)")
    p.add_argument("--overlay", type=Path, metavar="DIR", help="write a PNG per image with outline and decision")
    p.add_argument("--tta", action="store_true", help="average over flips and rotations (as evaluate.py --tta)")
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


def main(args):
    device = pick_device(args.device)
    models = load_run_models(args.run, device)
    settings = [checkpoint.get("preprocess") for _, checkpoint in models]
    if None in settings:
        fail(args.run, "a model has no preprocessing settings; retrain it with this version of train.py")
    settings = [preprocess_settings(s) for s in settings]
    if any(s != settings[0] for s in settings):
        fail(args.run, "its models were trained on differently preprocessed images; predict with each on its own")
    settings = settings[0]
    if settings["segmenter"] is not None:  # missing or changed: one line now, not a skip per image
        loaded_segmenter(settings["segmenter"], settings["segmenter_sha256"])
    thresholds = read_thresholds(args.run)
    if args.operating_point not in thresholds:
        fail(args.run / "thresholds.json", f"has no operating point '{args.operating_point}' "
             f"(it has {', '.join(thresholds) or 'none'})")
    threshold = thresholds[args.operating_point]
    out = args.out or args.run / "predictions.csv"
    for folder in [out.parent] + ([args.overlay] if args.overlay else []):
        check_writable(folder)  # before the work, not after it
    files = list_images(args.images)
    if not files:
        fail(" ".join(map(shown, args.images)), "no images found")

    metadata = metadata_features(pd.DataFrame({"age": [args.age], "sex": [args.sex], "localization": [args.site]}))
    rows, skipped = [], 0
    for path, overlay_name in zip(tqdm(files, desc="predicting"), overlay_names(files)):
        try:
            prepared = preprocess_image(path, **settings)
        except SystemExit as e:  # unreadable or degenerate: say which and go on with the rest
            print(f"skipped {str(e).removeprefix('error: ')}")
            skipped += 1
            continue
        arrays = {"full": prepared["image"][None], "crop": prepared["crop"][None], "mask": prepared["mask_small"][None]}
        probs, class_probs = ensemble_probs(models, arrays, [0], device, tta=args.tta, metadata=metadata)
        decision = "malignant" if probs[0] >= threshold else "benign"
        # no plausible lesion (a blank image, a photo of something else): the model's score is no diagnosis
        row = {"file": shown(path), "malignancy_prob": float(probs[0]),
               "decision": decision if prepared["mask_ok"] else "no lesion found",
               "threshold": threshold, "operating_point": args.operating_point,
               "mask_area": prepared["mask_area"], "mask_ok": prepared["mask_ok"]}
        if class_probs is not None:
            row.update({f"prob_{code}": float(class_probs[0, k]) for k, code in enumerate(DX_CODES)})
        if args.overlay:
            row["overlay"] = overlay_name
            overlay(path, prepared, row["decision"], probs[0], args.overlay / overlay_name)
        rows.append(row)
    if not rows:
        fail(" ".join(map(shown, args.images)), "none of the images could be read")
    write_csv(pd.DataFrame(rows), out)
    print(f"wrote {out}: {len(rows)} images" + (f", {skipped} skipped" if skipped else ""))


if __name__ == "__main__":
    main(parse_args())
