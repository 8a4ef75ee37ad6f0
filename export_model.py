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
  model.onnx, classes.onnx, segmenter.onnx
                   each network as ONNX (opset 17, any batch size; a metadata model's second input is
                   `metadata`), what predict.py, evaluate.py and the page run through ONNX Runtime:
                   checked against PyTorch before it is written (the largest probability difference on
                   --check-images, at most 1e-4, else nothing is written)
  onnx.json        each ONNX file's weights file and both SHA-256s, the largest difference found,
                   on which images, and the versions (an ONNX file whose weights file changed since
                   is not used)

--onnx FOLDER adds the ONNX files to a model folder that has none; --onnx-out DIR, there or in an
export, puts them elsewhere (make setup and make export write models/reference's into
cache/onnx/models/reference, where predict.py finds them: made on each machine rather than shipped,
they leave the folder its 25 MB).

Example: python export_model.py --run runs/study2/final/F1 --out models/reference
         python export_model.py --run runs/third_full/C_s0 --classes runs/seven/K0_s0 --out models/reference
         python export_model.py --onnx models/reference --check-images ../shared/data/ph2/images
"""
import io
import json
import os
import platform
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from common import (CLASS_MODEL_FILE, ENSEMBLE_FILE, METADATA_SIZE, ONNX_FILES, ONNX_RECORD, SHARED_TASK,
                    ArgumentParser, OnnxNetwork, atomic_path, check_same_preparation, cleaned_image, fail, file_digest,
                    git_commit, image_files, load_checkpoint, load_class_model, load_folder_models, load_segmenter,
                    load_torch_file, loaded_segmenter, lock_output, model_inputs, one_line_errors, predict_probs,
                    prepare_cleaned, read_json, read_thresholds, remove_hair, replace_folder, folder_preprocessing,
                    save_checkpoint, segmenter_logits, shares_network, shown, split_head, working_image, write_json)

ONNX_OPSET = 17
# The largest difference of a probability (malignancy, each class, each segmenter pixel) between an
# ONNX file and PyTorch that export accepts: far below what moves a decision (thresholds are read
# to 3 decimals), far above float32 rounding (about 1e-6)
ONNX_TOLERANCE = 1e-4
GENERATED_IMAGES = 16


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--run", type=Path, help="model folder of train.py with model.pt and thresholds.json")
    p.add_argument("--out", type=Path, help="model folder to write (for example models/NAME)")
    p.add_argument("--classes", type=Path, metavar="RUN",
                   help="a 7-class run (train.py --task multiclass) trained on images prepared as --run's were: "
                        f"its model goes in as {CLASS_MODEL_FILE}, the folder's 7 class probabilities")
    p.add_argument("--onnx", type=Path, metavar="FOLDER",
                   help="instead of exporting a run: add ONNX files (and onnx.json) to this model folder")
    p.add_argument("--onnx-out", type=Path, metavar="DIR",
                   help="write the ONNX files and onnx.json into DIR rather than beside the weights (make setup "
                        "and make export of models/reference: cache/onnx/models/reference, where predict.py finds "
                        "them, so the folder holds its weights once)")
    p.add_argument("--check-images", type=Path, nargs="+", metavar="PATH",
                   help="image files or folders the ONNX files are checked on against PyTorch (at most 64 "
                        f"images are read; default: {GENERATED_IMAGES} generated lesion-like images)")
    args = p.parse_args(argv)
    if args.onnx is None and (args.run is None or args.out is None):
        p.error("give --run and --out (export a run), or --onnx FOLDER (add ONNX files to a model folder)")
    if args.onnx is not None and (args.run or args.out or args.classes):
        p.error("--onnx FOLDER takes no --run, --out or --classes")
    return args


# ---------------------------------------------------------------------------------------------
# ONNX: each network of a model folder, checked against PyTorch


def generated_images(n, seed=0):
    """n lesion-like RGB images (a dark, blotchy ellipse on skin tones, 300x225): what the ONNX files
    are checked on where no real images are given (make setup, on a machine without data)."""
    import cv2
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        skin = rng.uniform([170, 120, 100], [230, 180, 160])
        image = np.ones((225, 300, 3)) * skin
        mask = np.zeros((225, 300), np.uint8)
        centre = (int(rng.integers(110, 190)), int(rng.integers(80, 145)))
        axes = (int(rng.integers(30, 80)), int(rng.integers(25, 60)))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        blotches = cv2.GaussianBlur(rng.uniform(0, 1, (225, 300)), (0, 0), 6)
        lesion = rng.uniform([60, 30, 20], [140, 90, 70]) * (0.7 + 0.6 * blotches[..., None])
        soft = cv2.GaussianBlur(mask.astype(np.float64), (0, 0), 3)[..., None]
        image = image * (1 - soft) + lesion * soft + rng.normal(0, 6, image.shape)
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


def check_image_files(paths, limit=64):
    files, missing = image_files(paths)
    if missing:
        fail(missing[0], "file not found")
    if not files:
        fail(" ".join(map(shown, paths)), "no images found")
    return files[:limit]


class PixelInput(torch.nn.Module):
    """A network that reads images as they come: uint8 N x H x W x C RGB, normalised as
    to_model_tensor does (the same arithmetic) and laid out NCHW inside the graph. Its ONNX file then
    needs nothing but the pixels from a caller in any language, and ONNX Runtime's own layout
    change costs less than a float copy in Python."""

    def __init__(self, network, normalisation, channels):
        super().__init__()
        self.network = network
        views = channels // 3
        self.register_buffer("mean", torch.tensor(normalisation["mean"]).repeat(views) * 255)
        self.register_buffer("std", torch.tensor(normalisation["std"]).repeat(views) * 255)

    def forward(self, image, metadata=None):
        x = ((image.float() - self.mean) / self.std).permute(0, 3, 1, 2)
        return self.network(x) if metadata is None else self.network(x, metadata)


def export_network(network, inputs, input_names, path):
    """One network as an ONNX file (the TorchScript exporter, every batch size), written whole or
    not at all."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        torch.onnx.export(network, inputs, buffer, input_names=input_names, output_names=["logits"],
                          dynamic_axes={name: {0: "batch"} for name in [*input_names, "logits"]},
                          opset_version=ONNX_OPSET, dynamo=False)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def classifier_difference(torch_model, onnx_model, images, checkpoint, task):
    """Largest difference of any probability (malignancy, the 7 classes) between the two, on the
    images with metadata unknown and with the same known age, sex and site for all."""
    metadata = None
    if checkpoint.get("metadata"):
        metadata = np.zeros((len(images), METADATA_SIZE), np.float32)
        metadata[:, [0, 1, 2, 4]] = (60 - 50) / 20, 1, 1, 1  # age 60 known, male, abdomen
    largest = 0.0
    for features in [None] + ([metadata] if metadata is not None else []):
        ours, theirs = (predict_probs(m, images, checkpoint["normalisation"], cpu(), task, metadata=features)
                        for m in (torch_model, onnx_model))
        for a, b in zip(ours, theirs):
            if a is not None:
                largest = max(largest, float(np.abs(a - b).max()))
    return largest


def cpu():
    return torch.device("cpu")


def checkpoint_fields(path):
    """Every field of a weights file but the weights, as the file holds them (a segmenter path
    relative to the folder stays relative): what the ONNX engine reads instead of the file."""
    fields = {}
    for key, value in load_torch_file(path, "checkpoint").items():
        try:
            if key != "model":
                json.dumps(value)
                fields[key] = value
        except (TypeError, ValueError):  # not JSON: nothing inference reads
            pass
    return fields


def add_onnx(folder, check_paths, out=None):
    """Write the ONNX file of each network of a model folder and onnx.json into out (default: the
    folder); each checked against the folder's PyTorch networks first, on real images
    (check_paths) or generated ones."""
    out = out or folder
    import onnxruntime
    models = load_folder_models(folder, cpu(), engine="torch")
    if len(models) != 1:
        fail(folder, "is an ensemble; its members run on PyTorch")
    model, checkpoint = models[0]
    class_model = load_class_model(folder, cpu(), models)
    settings = folder_preprocessing(models, folder)
    if check_paths:
        files = check_image_files(check_paths)
        images, checked_on = [], f"{len(files)} images from {', '.join(map(shown, check_paths))}"
        for path in files:
            images.append(cleaned_image(path, settings["work_size"], settings["hair_removal"]))
    else:
        checked_on = f"{GENERATED_IMAGES} generated lesion-like images (no --check-images given)"
        images = []
        for rgb in generated_images(GENERATED_IMAGES):
            small, scale = working_image(rgb, settings["work_size"])
            images.append((*remove_hair(small, settings["hair_removal"]), scale))
    prepared = prepare_cleaned(images, settings["cache_size"], settings["crop_margin"], settings["segmenter"],
                               settings["segmenter_sha256"], settings["colour_constancy"], settings["crop_fit"])
    arrays = {name: np.stack([p[key] for p in prepared])
              for name, key in (("full", "image"), ("crop", "crop"), ("mask", "mask_small"))}

    networks = [("model.pt", model, checkpoint, checkpoint["task"])]
    if class_model is not None:
        task = SHARED_TASK if class_model[1].get("shared") else class_model[1]["task"]
        networks.append((CLASS_MODEL_FILE, class_model[0], class_model[1], task))
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / ONNX_RECORD
    record_path.unlink(missing_ok=True)  # until every file below is written and checked, the folder has none
    record = {}
    for name, network, ck, task in networks:
        x = model_inputs(arrays, np.arange(len(prepared)), ck["input"], ck["input_size"])
        channels = x.shape[-1]
        example = [torch.zeros(2, ck["input_size"], ck["input_size"], channels, dtype=torch.uint8)]
        if ck.get("metadata"):
            example.append(torch.zeros(2, METADATA_SIZE))
        path = out / ONNX_FILES[name]
        export_network(PixelInput(network, ck["normalisation"], channels), tuple(example),
                       ["image", "metadata"][:len(example)], path)
        difference = classifier_difference(network, OnnxNetwork(path), x, ck, task)
        record[name] = {"onnx": path.name, "difference": difference, "compared": "probabilities (malignancy and "
                        "classes), metadata unknown and known", "checkpoint": checkpoint_fields(folder / name)}
    if settings["segmenter"] is not None:
        import cv2
        segmenter, seg_checkpoint = loaded_segmenter(settings["segmenter"], settings["segmenter_sha256"])
        if Path(settings["segmenter"]).resolve() != (folder / "segmenter.pt").resolve():
            fail(folder, "its model.pt names a segmenter outside the folder; export_model.py --run writes folders "
                 "that hold theirs")
        width, height = seg_checkpoint["input_size"]
        path = out / ONNX_FILES["segmenter.pt"]
        export_network(PixelInput(segmenter, seg_checkpoint["normalisation"], 3),
                       (torch.zeros(2, height, width, 3, dtype=torch.uint8),), ["image"], path)
        small = np.stack([cv2.resize(clean, (width, height), interpolation=cv2.INTER_AREA) for clean, _, _ in images])
        ours, theirs = (segmenter_logits(m, small, seg_checkpoint["normalisation"])
                        for m in (segmenter, OnnxNetwork(path)))
        difference = float(np.abs(1 / (1 + np.exp(-ours)) - 1 / (1 + np.exp(-theirs))).max())
        record["segmenter.pt"] = {"onnx": path.name, "difference": difference,
                                  "compared": "the lesion probability of every pixel",
                                  "checkpoint": checkpoint_fields(folder / "segmenter.pt")}
    for name, entry in record.items():
        if entry["difference"] > ONNX_TOLERANCE:
            for written in record.values():
                (out / written["onnx"]).unlink(missing_ok=True)
            fail(out / entry["onnx"], f"differs from PyTorch's {name} by {entry['difference']:.2g} (more than "
                 f"{ONNX_TOLERANCE:g}) on {checked_on}: not written")
        entry.update(source_sha256=file_digest(folder / name), sha256=file_digest(out / entry["onnx"]))
    write_json({"networks": record, "checked_on": checked_on, "tolerance": ONNX_TOLERANCE, "opset": ONNX_OPSET,
                "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                             "python": platform.python_version()}}, record_path)
    return record, checked_on


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


@one_line_errors
def main(args):
    if args.onnx is not None:
        if not (args.onnx / "model.pt").is_file():
            fail(args.onnx, "is no model folder (one holding model.pt)")
        out = args.onnx_out or args.onnx
        lock_output(out)
        record, checked_on = add_onnx(args.onnx, args.check_images, out)
        print(f"wrote {', '.join(entry['onnx'] for entry in record.values())} into {shown(out)}; largest "
              f"probability difference from PyTorch on {checked_on}: " +
              ", ".join(f"{entry['onnx']} {entry['difference']:.1g}" for entry in record.values()))
        return
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
        onnx, checked_on = add_onnx(build, args.check_images, args.onnx_out)
        write_json({**origin, "exported_at_commit": git_commit(),
                    "sha256": {p.name: file_digest(p) for p in sorted(build.iterdir())},
                    "onnx": {"checked_on": checked_on, "largest_probability_difference":
                             {entry["onnx"]: entry["difference"] for entry in onnx.values()}}},
                   build / "export.json")
        if args.out.is_dir():
            # an old classes.pt is not kept (it may not fit the new model), nor ONNX files of old weights
            stale = {CLASS_MODEL_FILE, ONNX_RECORD, *ONNX_FILES.values()}
            for kept in args.out.iterdir():
                if kept.is_file() and kept.name not in stale and not (build / kept.name).exists():
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
