"""Preprocessing throughput on 600x450 JPEGs (the size of the HAM10000 originals), all steps
included: JPEG decoding, hair removal, segmentation, crop, resizing, mask PNGs and cache arrays.

The images are made from ../shared/data: every PH2 image (real hairs and vignettes) and HAM10000
images, resized to 600x450 and saved as JPEG (quality 95) in a temporary folder. Prints and writes
a JSON line with images per second.

Example: python bench/preprocess_speed.py --n 500 --workers 2 --out bench/results/preprocess_speed.json
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import preprocess  # noqa: E402
from common import one_line_errors, write_json  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500, help="images (all 100 PH2 images, the rest HAM10000)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache-size", "--img-size", type=int, default=224)
    p.add_argument("--out", type=Path, help="JSON file for the result")
    return p.parse_args(argv)


def make_images(folder, n):
    ph2 = pd.read_csv(SHARED / "ph2" / "labels.csv")
    ham = pd.read_csv(SHARED / "ham10000_224" / "labels.csv").head(max(0, n - len(ph2)))
    sources = [SHARED / "ph2" / f for f in ph2["filename"]][:n] + [SHARED / "ham10000_224" / f for f in ham["filename"]]
    rows = []
    (folder / "images").mkdir(parents=True)
    for k, source in enumerate(sources):
        image = cv2.resize(cv2.imread(str(source)), (600, 450), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / "images" / f"B{k:05d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        rows.append({"image_id": f"B{k:05d}", "filename": f"images/B{k:05d}.jpg", "lesion_id": f"B{k:05d}",
                     "dx": "nv", "malignant": 0, "split": "train"})
    pd.DataFrame(rows).to_csv(folder / "metadata.csv", index=False)
    return len(rows)


@one_line_errors
def main(args):
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "bench600"
        n = make_images(data, args.n)
        started = time.perf_counter()
        preprocess.main(preprocess.parse_args(["--data", str(data), "--out", str(Path(tmp) / "cache"),
                                               "--cache-size", str(args.cache_size), "--workers", str(args.workers)]))
        seconds = time.perf_counter() - started
    result = {"images": n, "size": "600x450 JPEG", "workers": args.workers, "seconds": round(seconds, 2),
              "images_per_second": round(n / seconds, 1)}
    print(json.dumps(result))
    if args.out:
        write_json(result, args.out)


if __name__ == "__main__":
    main(parse_args())
