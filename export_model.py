"""Write a trained run as a compact model folder: what predict.py and evaluate.py read, in half the
space (fp16 weights) and without what only training needs (last.pt, the optimiser's state).

Reads <run>/model.pt, <run>/thresholds.json and the segmenter model.pt names, if any.
Writes into --out (replaced whole at the end, so a failed export leaves the old folder as it was;
files of the old folder that an export does not write, such as MODEL_CARD.md, are kept):
  model.pt         the classifier: every field of the run's model.pt, its weights in fp16
  segmenter.pt     the U-Net its images were segmented by, weights in fp16; model.pt names it by this
                   path relative to the folder and its SHA-256
  thresholds.json  the run's, unchanged: chosen on the full-precision model's validation
                   probabilities (bench/reference_model.py measures how far the fp16 copy moves them)
  classes.pt       with --classes RUN: that 7-class run's model, weights in fp16, read from the same
                   prepared images as model.pt (one segmenter pass); predict.py and evaluate.py take
                   the 7 class probabilities from it and malignancy from model.pt, unchanged. A head
                   trained on model.pt's frozen network (train.py --frozen-from) is stored alone
                   (a few kB), and both answers then come from one pass of that network
  export.json      where it came from: the run(s), their config.json, the commit, each file's SHA-256

Example: python export_model.py --run runs/study2/final/F1 --out models/reference
         python export_model.py --run runs/third_full/C_s0 --classes runs/seven/K0_s0 --out models/reference
"""
import os
import shutil
from pathlib import Path

from common import (CLASS_MODEL_FILE, ENSEMBLE_FILE, ArgumentParser, check_same_preparation, fail, file_digest,
                    git_commit, load_checkpoint, load_segmenter, lock_output, read_json, read_thresholds,
                    replace_folder, save_checkpoint, shares_network, shown, split_head, write_json)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--run", type=Path, required=True, help="run folder of train.py with model.pt and thresholds.json")
    p.add_argument("--out", type=Path, required=True, help="model folder to write (for example models/NAME)")
    p.add_argument("--classes", type=Path, metavar="RUN",
                   help="a 7-class run (train.py --task multiclass) trained on images prepared as --run's were: "
                        f"its model goes in as {CLASS_MODEL_FILE}, the folder's 7 class probabilities")
    return p.parse_args(argv)


def class_checkpoint(run, checkpoint):
    """The 7-class run's checkpoint, checked to read the images exactly as the binary model does."""
    if (run / ENSEMBLE_FILE).is_file():
        fail(run, "is an ensemble; --classes takes one 7-class run")
    _, classes = load_checkpoint(run / "model.pt")
    if classes["task"] != "multiclass":
        fail(run / "model.pt", f"is a {classes['task']} model; --classes takes a 7-class run (--task multiclass)")
    check_same_preparation(run / "model.pt", classes, checkpoint)
    return classes


def half(state_dict):
    """Floating-point tensors in fp16 (loading casts them back to the model's fp32); counters stay."""
    return {name: tensor.half() if tensor.is_floating_point() else tensor for name, tensor in state_dict.items()}


def main(args):
    if (args.run / ENSEMBLE_FILE).is_file():
        fail(args.run, "is an ensemble; export its members one by one")
    _, checkpoint = load_checkpoint(args.run / "model.pt")
    read_thresholds(args.run)  # a run without chosen thresholds is not a model to hand on
    classes = class_checkpoint(args.classes, checkpoint) if args.classes else None
    lock_output(args.out)
    build = args.out.with_name(f".{args.out.name}.export{os.getpid()}")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    try:
        preprocess = dict(checkpoint["preprocess"])
        if preprocess.get("segmenter_model"):
            _, segmenter = load_segmenter(preprocess["segmenter_model"], preprocess["segmenter_sha256"])
            save_checkpoint({**segmenter, "model": half(segmenter["model"])}, build / "segmenter.pt")
            preprocess.update(segmenter_model="segmenter.pt", segmenter_sha256=file_digest(build / "segmenter.pt"))
        save_checkpoint({**checkpoint, "model": half(checkpoint["model"]), "preprocess": preprocess},
                        build / "model.pt")
        if classes is not None:
            if shares_network(classes, [(None, checkpoint)]):  # a head on model.pt's network: the head alone
                classes = {**classes, "shares_network_of": "model.pt",
                           "model": split_head(classes["model"])[1]}
            save_checkpoint({**classes, "model": half(classes["model"]), "preprocess": preprocess},
                            build / CLASS_MODEL_FILE)
        shutil.copyfile(args.run / "thresholds.json", build / "thresholds.json")
        config = args.run / "config.json"
        origin = {"run": shown(args.run), "run_config": read_json(config) if config.is_file() else None}
        if classes is not None:
            config = args.classes / "config.json"
            origin.update(classes_run=shown(args.classes),
                          classes_run_config=read_json(config) if config.is_file() else None)
        write_json({**origin, "exported_at_commit": git_commit(),
                    "sha256": {p.name: file_digest(p) for p in sorted(build.iterdir())}}, build / "export.json")
        if args.out.is_dir():
            for kept in args.out.iterdir():  # an old classes.pt is not kept: it may not fit the new model
                if kept.is_file() and kept.name != CLASS_MODEL_FILE and not (build / kept.name).exists():
                    shutil.copy2(kept, build / kept.name)
        replace_folder(build, args.out)
    except OSError as e:
        fail(args.out, f"could not be written ({e.strerror or e})")
    finally:
        shutil.rmtree(build, ignore_errors=True)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {shown(args.out)}: {', '.join(sorted(p.name for p in args.out.iterdir()))} "
          f"({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main(parse_args())
