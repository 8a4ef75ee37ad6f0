"""Draw what an augmentation does to real training images: each row one cached image (the model's
input form), then --draws augmented copies of it, as train.py makes them for one batch.

Example: python bench/augmentation_sheet.py --cache cache/hamfull_trainval_224_third_pad --aug shift
             --out docs/results/third/shift_augmentation.png
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from common import load_cache, model_inputs, one_line_errors, save_image_grid  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--aug", default="shift", choices=train.AUGMENTATIONS)
    p.add_argument("--input", default="crop", choices=["full", "crop"])
    p.add_argument("--input-size", "--img-size", type=int, default=160, help="the network's input size")
    p.add_argument("--images", type=int, default=6, help="rows: training images drawn at random")
    p.add_argument("--draws", type=int, default=5, help="augmented copies of each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


@one_line_errors
def main(args):
    torch.manual_seed(args.seed)
    index, arrays = load_cache(args.cache)
    train_rows = index[index["split"] == "train"]
    picked = train_rows.sample(args.images, random_state=args.seed)
    images = torch.from_numpy(model_inputs(arrays, picked["row"], args.input, args.input_size))
    augment = train.make_augment(args.aug, args.input_size)
    identity = {"mean": [0.0] * 3, "std": [1 / 255] * 3}  # to_model_tensor then gives back 0-255
    tiles, titles = [], []
    for image, row in zip(images, picked.itertuples()):
        batch = image.unsqueeze(0).repeat(args.draws, 1, 1, 1)
        drawn = train.augment_batch(batch, augment, identity, noise=0, hue=0.02, shift=args.aug == "shift")
        tiles.append(image.numpy())
        titles.append(f"{row.image_id} ({row.dx})")
        for view in drawn.permute(0, 2, 3, 1).clamp(0, 255).numpy().astype(np.uint8):
            tiles.append(view)
            titles.append(f"--aug {args.aug}")
    save_image_grid(tiles, titles, args.out, columns=args.draws + 1, tile_inches=(1.7, 1.9))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(parse_args())
