"""Training throughput on the CPU: the input pipeline alone, and our training step against a plain
loop over the same model, measured side by side in one run.

- input pipeline: reading the training images of a preprocess cache (memory-mapped arrays), the
  full augmentation (torchvision.transforms.v2) and normalisation, in batches, no model.
- plain loop: the model in PyTorch's default memory format, eager, fp32, Adam, BCEWithLogits.
- ours: what train.py does: channels-last memory format and autocast at --precision auto.
- with --variants: each memory format (contiguous, channels-last) under each precision (fp32,
  bf16 autocast), so the faster one can be chosen for train.py's default.
Each training figure is the median of --rounds alternating rounds of --steps timed steps.

Example: python bench/train_speed.py --cache cache/ham224_224 --input-size 224 --out bench/results/train_speed.json
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from common import load_cache, model_inputs, one_line_errors, write_json  # noqa: E402
from networks import build_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--input-size", "--img-size", type=int, default=224, help="the network's input size")
    p.add_argument("--archs", nargs="+", default=["efficientnet_lite0", "resnet18"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--aug", default="full", choices=train.AUGMENTATIONS, help="the input pipeline's augmentation")
    p.add_argument("--variants", action="store_true",
                   help="also time every memory format under fp32 and bf16 autocast")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def input_pipeline_speed(cache, input_size, batch_size, aug="full", n=1024):
    started = time.perf_counter()
    index, arrays = load_cache(cache)
    rows = index[index["split"] == "train"]["row"].to_numpy()[:n]
    images = torch.from_numpy(model_inputs(arrays, rows, "full", input_size))
    augment = train.make_augment(aug, input_size)
    normalisation = {"mean": [0.5] * 3, "std": [0.5] * 3}
    for start in range(0, len(images), batch_size):
        train.augment_batch(images[start:start + batch_size], augment, normalisation, noise=0.02, hue=0.02,
                            shift=aug == "shift")
    return len(images) / (time.perf_counter() - started)


def step_speed(model, x, y, steps, channels_last, dtype):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    criterion = torch.nn.BCEWithLogitsLoss()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = criterion(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: first-call allocations and kernel selection
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(x) / (time.perf_counter() - started)


@one_line_errors
def main(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"threads": args.threads, "input_size": args.input_size, "batch_size": args.batch_size, "aug": args.aug,
              "input_pipeline_images_per_s": round(input_pipeline_speed(args.cache, args.input_size, args.batch_size,
                                                                        args.aug), 1)}
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size)
    y = torch.randint(0, 2, (args.batch_size, 1)).float()
    for arch in args.archs:
        dtype = train.autocast_dtype("auto", torch.device("cpu"), arch)
        plain, ours = [], []
        for _ in range(args.rounds):  # alternate, so drift in machine speed hits both alike
            plain.append(step_speed(build_model(arch, 1, pretrained=False)[0], x, y, args.steps, False, None))
            ours.append(step_speed(build_model(arch, 1, pretrained=False)[0], x, y, args.steps, True, dtype))
        result[arch] = {"precision_auto": "fp32" if dtype is None else str(dtype).replace("torch.", ""),
                        "plain_images_per_s": round(statistics.median(plain), 1),
                        "ours_images_per_s": round(statistics.median(ours), 1),
                        "speedup": round(statistics.median(ours) / statistics.median(plain), 2),
                        "input_pipeline_over_ours": round(result["input_pipeline_images_per_s"] /
                                                          statistics.median(ours), 1)}
        if args.variants:
            variants = {f"{precision}_{layout}": [] for precision in ("fp32", "bf16")
                        for layout in ("contiguous", "channels_last")}
            for _ in range(args.rounds):
                for name, speeds in variants.items():
                    precision, layout = name.split("_", 1)
                    speeds.append(step_speed(build_model(arch, 1, pretrained=False)[0], x, y, args.steps,
                                             layout == "channels_last",
                                             torch.bfloat16 if precision == "bf16" else None))
            result[arch]["variants_images_per_s"] = {name: round(statistics.median(v), 1)
                                                     for name, v in variants.items()}
        print(arch, json.dumps(result[arch]), flush=True)
    print(json.dumps(result))
    if args.out:
        write_json(result, args.out)


if __name__ == "__main__":
    main(parse_args())
