"""Step 3: train a benign/malignant (or 7-class) classifier on the preprocess cache.

Reads the cache of preprocess.py (index.csv with train/val splits, images.npy, crops.npy, masks.npy).
Writes into the model folder:
  model.pt        the best epoch by validation ROC-AUC (binary), balanced accuracy (multiclass) or
                  their mean (joint: one network for both answers):
                  weights plus everything needed to rebuild the model and its preprocessing
                  (arch, task, normalisation, input form, image size, whether it reads metadata)
  last.pt         the latest epoch with optimiser, scheduler and RNG state, for --resume
  history.csv     epoch, train_loss, val_loss, val_auc, val_bal_acc, lr, seconds, images_per_s
  val_probs.csv   image_id, lesion_id, dx, label (1 = malignant), prob (malignancy), and for
                  multiclass prob_<dx> for each class, from the best epoch
  config.json     all arguments, library versions, git commit, the cache key
  segmenter.pt    where the cache was segmented by the U-Net: that very file (a hard link where the
                  file system allows), which model.pt names by this relative path and its SHA-256,
                  so the model folder can be copied or moved whole

Distributed: torchrun --nproc_per_node=N train.py ... trains with DistributedDataParallel (gloo on
CPU, NCCL on CUDA); --batch-size is the total over processes and only rank 0 writes files.

Example: python train.py --cache cache/ham224_224 --run-dir runs/lite0 --arch efficientnet_lite0
"""
import copy
import math
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torchvision
from torchvision.transforms import v2
from tqdm import tqdm

from common import (DX_CODES, INPUTS, SHARED_TASK, TASKS, ArgumentParser, atomic_path, autocast_dtype,
                    balanced_accuracy_7, check_preprocessing, cosine_with_warmup, fail, file_digest, git_commit,
                    hide_metadata, load_cache, load_checkpoint, load_torch_file, lock_output, metadata_features,
                    model_inputs, number_in, one_line_errors, optimisation_step, pick_device, predict_probs,
                    prepare_model, ranking_metrics, read_json, save_checkpoint, split_head, to_model_tensor, write_csv,
                    write_json)
from networks import ARCHITECTURES, build_model


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--cache", type=Path, required=True, help="cache folder written by preprocess.py")
    p.add_argument("--run-dir", type=Path, required=True, help="folder for the run's outputs")
    p.add_argument("-a", "--arch", default="efficientnet_lite0", choices=list(ARCHITECTURES))
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="train from scratch instead of from ImageNet weights")
    p.add_argument("--weights", type=Path, help="local ImageNet state dict (no download)")
    p.add_argument("--task", default="binary", choices=TASKS,
                   help="binary: malignant vs benign; multiclass: the 7 HAM10000 classes; joint: one network for "
                        "both, a malignancy logit (--loss bce/wbce) beside the 7 classes' (CrossEntropy, "
                        "--class-weights), trained on the sum of the two losses (docs/fourth_edition.md)")
    p.add_argument("--loss", choices=["ce", "bce", "wbce"],
                   help="ce: CrossEntropy; bce: BCEWithLogits; wbce: with pos_weight (default: wbce for "
                        "binary, ce for multiclass)")
    p.add_argument("--pos-weight", type=number_in(float, 0, low_open=True),
                   help="wbce weight of the malignant class (default: benign/malignant of train)")
    p.add_argument("--class-weights", default="none", choices=["none", "balanced"],
                   help="multiclass CE weights: balanced = inverse class frequency")
    p.add_argument("--sampler", default="none", choices=["none", "balanced", "source"],
                   help="balanced: draw each class equally often (with replacement); source: each source of a "
                        "dataset of several equally often (with replacement)")
    p.add_argument("--epoch-size", type=number_in(int, 1), metavar="N",
                   help="images drawn an epoch (default: every training image once); without a sampler the "
                        "images are drawn in turn across epochs, each once before any twice")
    p.add_argument("--label-smoothing", type=number_in(float, 0, 0.5), default=0.0, metavar="EPS",
                   help="CrossEntropy's label smoothing (--loss ce): the target gives EPS of its weight evenly "
                        "to every class, so the network is not pushed to certainty on HAM10000's noisy labels")
    p.add_argument("--class-loss-weight", type=number_in(float, 0), default=1.0, metavar="W",
                   help="--task joint: the 7 classes' CrossEntropy is weighted W beside the malignancy's BCE (1: "
                        "their plain sum); below 1 the classes pull the shared network less (docs/fourth_edition.md, "
                        "arm JLW)")
    p.add_argument("--frozen-from", type=Path, metavar="MODEL",
                   help="train only a new head on this model.pt's network and metadata embedding, frozen (a "
                        "run's or a model folder's, trained with --metadata on images prepared as --cache's): "
                        "export_model.py --classes then gives a folder that reads malignancy and the 7 classes "
                        "in one pass of one network (docs/seven_classes.md, arm K4)")
    p.add_argument("--init-from", type=Path, metavar="MODEL",
                   help="--task joint: start from this binary model.pt's network, metadata embedding and "
                        "malignancy logit (a run's or a model folder's, trained with --metadata on images prepared "
                        "as --cache's), the 7 class logits new, and train all of it: the classes learned on a "
                        "network trained for malignancy first (docs/fourth_edition.md, arm JC)")
    p.add_argument("--init-head", type=Path, metavar="MODEL",
                   help="with --init-from: the 7 class logits start from this model's head, a --task multiclass "
                        "run trained with --frozen-from on --init-from's model (a linear probe), so that the "
                        "network is fine-tuned from a head that already names the classes (linear probing, then "
                        "fine-tuning: docs/fourth_edition.md, arm JLP)")
    p.add_argument("--aug", default="full", choices=AUGMENTATIONS,
                   help="basic: flips; full: flips, rotation, RandomResizedCrop, colour jitter, noise; shift: full "
                        "plus another clinic's camera: a dark circular frame, defocus blur, gamma, JPEG "
                        "re-compression, zoom out, aspect, colour gains (docs/third_edition.md, lever L2)")
    p.add_argument("--resolution-aug", type=number_in(int, 8), metavar="SIDE",
                   help="bring each training image with probability 0.5 to SIDE px and back, so that a source's "
                        "resolution (BCN20000's 84 px) says nothing about its clinic")
    p.add_argument("--frame-aug", type=number_in(float, 0, 1), default=0.0, metavar="P",
                   help="draw a dermatoscope's dark circular frame (--aug shift's) on each training image with "
                        "probability P, so that the frame says nothing about the clinic")
    p.add_argument("--input", default="full", choices=INPUTS,
                   help="whole image, masked, lesion crop, or both: the crop and the whole image through one network")
    p.add_argument("--val-source", nargs="+", metavar="NAME",
                   help="choose the epoch on these sources' val rows alone (a dataset of several sources): another "
                        "source's val images then choose nothing, and stay fit to judge the model")
    p.add_argument("--metadata", action="store_true",
                   help="also feed age, sex and anatomical site (index.csv's age, sex, localization), where known")
    p.add_argument("--general-sites", action="store_true",
                   help="with --metadata, read the ISIC Archive's general site words (torso, head/neck...) as the "
                        "HAM10000 sites they cover, in training and in every later reading of the model")
    p.add_argument("--hide-metadata", type=number_in(float, 0, 1), default=0.25, metavar="P",
                   help="with --metadata, hide each field of a training image with probability P, so the "
                   "model also scores images without it")
    p.add_argument("--input-size", "--img-size", type=number_in(int, 32),
                   help="the network's input size: the cache's images are resized to it (default: the cache's size)")
    p.add_argument("--epochs", type=number_in(int, 1), default=10)
    p.add_argument("-b", "--batch-size", type=number_in(int, 1), default=32, help="total over all processes")
    p.add_argument("--lr", type=number_in(float, 0, low_open=True), default=1e-3, help="peak learning rate")
    p.add_argument("--optimizer", default="adam", choices=["adam", "adamw"])
    p.add_argument("--weight-decay", type=number_in(float, 0), default=0.0)
    p.add_argument("--warmup-epochs", type=number_in(float, 0), default=0.5,
                   help="linear warm-up before the cosine decay")
    p.add_argument("--patience", type=number_in(int, 1),
                   help="stop after this many epochs without a better validation score")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on CUDA (fp16 where bf16 is missing) and, for ResNets, on CPUs with native "
                        "bf16; fp32 on MPS, other CPUs and for EfficientNet-Lite on any CPU (faster there)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--threads", type=number_in(int, 1), help="CPU threads for torch (default: cores / processes)")
    p.add_argument("--resume", action="store_true", help="continue from the model folder's last.pt")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# pieces of the recipe


AUGMENTATIONS = ("none", "basic", "full", "shift")


def make_augment(level, input_size):
    """Per-image random transforms on uint8 CHW tensors (torchvision.transforms.v2). Dermoscopy
    has no up or down, so vertical flips and any rotation are fair. shift adds what another
    clinic's camera changes (the rest of it in acquisition_shift, on the batch): the lesion's scale
    in the frame (zoom out with a black surround, a wider crop range), aspect, stronger brightness
    and contrast, and JPEG re-compression."""
    if level == "none":
        return None
    steps = [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if level == "full":
        steps = [v2.RandomResizedCrop(input_size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
                 *steps, v2.RandomRotation(180),
                 # hue is jittered on the whole batch at once (random_hue): v2's per-image hue
                 # cost 1.7 ms an image on the CPU, more than all the rest together
                 v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)]
    if level == "shift":
        steps = [v2.RandomApply([v2.RandomZoomOut(fill=0, side_range=(1.0, 1.6))], p=0.3),
                 v2.RandomResizedCrop(input_size, scale=(0.4, 1.0), ratio=(0.7, 1.43), antialias=True),
                 *steps, v2.RandomRotation(180),
                 v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),
                 v2.RandomApply([jpeg_recompression], p=0.3)]
    return v2.Compose(steps)


def jpeg_recompression(image, quality=(30, 90)):
    """A uint8 CHW image through a JPEG encoder at a random quality and back, as another clinic's
    software may have saved it (OpenCV's codec: torchvision's is deprecated)."""
    import cv2
    level = int(torch.randint(quality[0], quality[1] + 1, ()))
    ok, encoded = cv2.imencode(".jpg", image.permute(1, 2, 0).numpy(), [cv2.IMWRITE_JPEG_QUALITY, level])
    return torch.from_numpy(cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)).permute(2, 0, 1).contiguous()


def acquisition_shift(images, p=0.3):
    """Batch transforms of what differs between dermatoscopes, each drawn per image with
    probability p: the dark circular frame many dermatoscopes leave (a vignette of random radius,
    centre, softness and darkness), defocus blur, gamma, and per-channel colour gains (a cast
    beyond what Shades of Gray removes). Float NHWC (0-255) in and out."""
    n, height, width, _ = images.shape
    images = images.float()
    chosen = torch.rand(n) < p  # defocus: a Gaussian blur of its own width per chosen image
    for i in torch.nonzero(chosen).flatten().tolist():
        sigma = float(torch.empty(1).uniform_(0.5, 2.0)) * width / 128
        kernel = 2 * math.ceil(2 * sigma) + 1
        images[i] = v2.functional.gaussian_blur(images[i].permute(2, 0, 1), [kernel, kernel], [sigma, sigma]) \
            .permute(1, 2, 0)
    gamma = torch.where(torch.rand(n) < p, torch.empty(n).uniform_(-0.4, 0.4).exp(), torch.ones(n))
    images = 255 * (images / 255).clamp(0, 1).pow(gamma.view(-1, 1, 1, 1))
    gains = torch.where((torch.rand(n) < p).view(-1, 1), torch.empty(n, 3).uniform_(-0.15, 0.15).exp(),
                        torch.ones(n, 3))
    images = images * gains.view(n, 1, 1, 3)
    return dark_frame(images, p).clamp_(0, 255)


def dark_frame(images, p):
    """The dark circular frame many dermatoscopes leave, drawn on each image with probability p: a
    vignette of random radius, centre, softness and darkness. Float NHWC (0-255) in and out."""
    n, height, width, _ = images.shape
    framed = torch.rand(n) < p
    if framed.any():
        y = torch.linspace(-1, 1, height).view(1, -1, 1)
        x = torch.linspace(-1, 1, width).view(1, 1, -1)
        k = int(framed.sum())
        centre = torch.empty(k, 2).uniform_(-0.1, 0.1)
        radius = torch.empty(k, 1, 1).uniform_(0.85, 1.35)  # 1: the circle touches the sides; 1.41: the corners
        softness = torch.empty(k, 1, 1).uniform_(0.02, 0.12)
        darkness = torch.empty(k, 1, 1).uniform_(0.0, 0.2)  # what is left of the image beyond the frame
        distance = ((x - centre[:, 0].view(-1, 1, 1)) ** 2 + (y - centre[:, 1].view(-1, 1, 1)) ** 2).sqrt()
        inside = torch.sigmoid((radius - distance) / softness)
        images[framed] = images[framed] * (darkness + (1 - darkness) * inside).unsqueeze(-1)
    return images


def low_resolution(images, side, p=0.5):
    """Each image with probability p brought down to side x side px (antialiased) and back up
    (bilinear), as a photo of that resolution looks at the network's size: BCN20000's 84 px images
    then look like any source's. uint8 NHWC in and out."""
    chosen = torch.nonzero(torch.rand(len(images)) < p).flatten()
    if len(chosen) == 0:
        return images
    size = images.shape[1:3]
    x = images[chosen].permute(0, 3, 1, 2).float()
    small = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    back = torch.nn.functional.interpolate(small, size=size, mode="bilinear", align_corners=False)
    images = images.clone()
    images[chosen] = back.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return images


def random_hue(images, max_turn):
    """Rotate each image's hue by its own random angle (up to max_turn of a full turn): the
    linear RGB hue rotation about the grey axis, one 3x3 matrix per image, so the whole batch
    costs one einsum. uint8 NHWC in, float NHWC (0-255) out."""
    angle = (torch.rand(len(images)) * 2 - 1) * max_turn * 2 * math.pi
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    third = torch.full((3, 3), 1 / 3)
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) / math.sqrt(3)
    rotation = cos * (torch.eye(3) - third) + sin * cross + third  # Rodrigues about (1, 1, 1)
    return torch.einsum("nhwc,ndc->nhwd", images.float(), rotation).clamp_(0, 255)


def augment_views(images, augment, hue, shift, low_side=None, frame=0.0):
    """uint8 NHWC batch of one view -> augmented (float 0-255 after hue, shift or frame, else uint8).
    low_side: the resolution guard (low_resolution), before the rest; frame: dark_frame's p, last."""
    if low_side:
        images = low_resolution(images, low_side)
    if augment is not None:
        images = torch.stack([augment(image) for image in images.permute(0, 3, 1, 2)]).permute(0, 2, 3, 1)
    if hue:
        images = random_hue(images, hue)
    if shift:
        images = acquisition_shift(images)
    if frame:
        images = dark_frame(images.float(), frame)
    return images


def augment_batch(images, augment, normalisation, noise, hue=0.0, shift=False, low_side=None, frame=0.0):
    """uint8 NHWC batch -> augmented, normalised float batch for the model. Two views (--input
    both, 6 channels) are augmented each on its own: they frame the lesion differently."""
    if images.shape[-1] > 3:
        images = torch.cat([augment_views(images[..., k:k + 3], augment, hue, shift, low_side, frame).float()
                            for k in range(0, images.shape[-1], 3)], dim=-1)
    else:
        images = augment_views(images, augment, hue, shift, low_side, frame)
    x = to_model_tensor(images, normalisation)
    if noise:
        # drawn in NHWC to match x's channels-last memory: randn_like on it was 6x slower
        x = x + noise * torch.randn(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2)
    return x


class JointLoss(torch.nn.Module):
    """--task joint: BCE (with pos_weight for wbce) of the malignancy logit (column 0) plus the
    CrossEntropy of the 7 class logits; targets are (malignant, class index) rows."""

    def __init__(self, binary, classes, class_weight=1.0):
        super().__init__()
        self.binary, self.classes, self.class_weight = binary, classes, class_weight

    def forward(self, logits, targets):
        return (self.binary(logits[:, 0], targets[:, 0].float())
                + self.class_weight * self.classes(logits[:, 1:], targets[:, 1]))


def class_loss(args, targets):
    """CrossEntropy of the 7 classes, with --class-weights and --label-smoothing."""
    weight = None
    if args.class_weights == "balanced":
        counts = torch.bincount(targets, minlength=len(DX_CODES)).float().clamp(min=1)
        weight = counts.sum() / (len(DX_CODES) * counts)
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=args.label_smoothing)


def loss_and_targets(args, train_rows):
    """(criterion, number of outputs, targets of the training rows)."""
    classes = torch.tensor([DX_CODES.index(dx) for dx in train_rows["dx"]])
    if args.task == "multiclass":
        if args.loss != "ce":
            fail(f"--loss {args.loss}", "the multiclass task trains with CrossEntropy (--loss ce)")
        return class_loss(args, classes), len(DX_CODES), classes
    malignant = torch.tensor(train_rows["malignant"].to_numpy())
    if args.task == SHARED_TASK:
        if args.loss == "ce":
            fail("--loss ce", "the joint task's malignancy logit trains with --loss bce or wbce")
        pos_weight = None
        if args.loss == "wbce":
            n_pos = int(malignant.sum())
            pos_weight = torch.tensor(args.pos_weight or (len(malignant) - n_pos) / n_pos)
        return (JointLoss(torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight), class_loss(args, classes),
                          args.class_loss_weight),
                1 + len(DX_CODES), torch.stack([malignant, classes], dim=1))
    targets = malignant
    if args.label_smoothing and args.loss != "ce":
        fail(f"--label-smoothing {args.label_smoothing}", "applies to CrossEntropy (--loss ce) only")
    if args.loss == "ce":
        return torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing), 2, targets
    pos_weight = None
    if args.loss == "wbce":
        n_pos = int(targets.sum())
        pos_weight = torch.tensor([args.pos_weight or (len(targets) - n_pos) / n_pos])
    return torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight), 1, targets


def batch_targets(criterion, targets):
    return targets.float().unsqueeze(1) if isinstance(criterion, torch.nn.BCEWithLogitsLoss) else targets.long()


def epoch_order(targets, sampler, seed, epoch, groups=None, size=None):
    """The training images of one epoch, in order; the same on every process (seeded by epoch),
    so processes can take disjoint shards and a resumed run sees the same order. size: images an
    epoch (default all); without a sampler they are drawn in turn across epochs, every image once
    before any twice. groups: each image's source, for the source sampler."""
    n = len(targets)
    size = size or n
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    if sampler in ("balanced", "source"):
        labels = (targets[:, -1] if targets.dim() > 1 else targets) if sampler == "balanced" else groups
        weights = (1.0 / torch.bincount(labels).float())[labels]
        return torch.multinomial(weights, size, replacement=True, generator=generator)
    if size == n:
        return torch.randperm(n, generator=generator)
    first, last = epoch * size, (epoch + 1) * size  # positions in a sequence of whole passes
    passes = [torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + 500 + k))
              for k in range(first // n, (last - 1) // n + 1)]
    return torch.cat(passes)[first - (first // n) * n:last - (first // n) * n]


def source_network(path, flag, args, input_size):
    """The model of --frozen-from or --init-from (its network is shared or continued) and its
    checkpoint, checked to read images exactly as this run does."""
    if not args.metadata:
        fail(flag, "needs --metadata: the network shared is a metadata model's")
    source, checkpoint = load_checkpoint(path)
    for key, ours in (("arch", args.arch), ("input", args.input), ("input_size", input_size), ("metadata", True)):
        if checkpoint.get(key) != ours:
            fail(path, f"has {key} {checkpoint.get(key)!r}, this run {ours!r}: a head is trained on "
                 "the network exactly as that model reads its images")
    if not checkpoint.get("preprocess"):
        fail(path, "has no preprocessing settings; retrain it with this version of train.py")
    check_preprocessing(args.cache, [(source, checkpoint)])
    return source, checkpoint


def frozen_network(model, args, input_size):
    """The new model with --frozen-from's network and metadata embedding loaded and frozen (its
    head alone trains); returns the source's normalisation. The frozen part must stay exactly the
    source's, batch-norm statistics included, so that a model folder can share it (train_one_epoch
    keeps it in eval mode)."""
    source, checkpoint = source_network(args.frozen_from, "--frozen-from", args, input_size)
    network = split_head(source.state_dict())[0]
    model.load_state_dict({**model.state_dict(), **network})
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name not in network
    return checkpoint["normalisation"]


def initial_network(model, args, input_size):
    """The joint model started from --init-from's binary model: its network and metadata embedding,
    and its malignancy logit as the joint head's first row (the 7 class rows keep their fresh
    start); everything then trains. Returns the source's normalisation."""
    source, checkpoint = source_network(args.init_from, "--init-from", args, input_size)
    if checkpoint["task"] != "binary" or checkpoint["num_outputs"] != 1:
        fail(args.init_from, f"is a {checkpoint['task']} model with {checkpoint['num_outputs']} logits; --init-from "
             "needs a binary one with one malignancy logit")
    network, head = split_head(source.state_dict())
    state = {**model.state_dict(), **network}
    probe = probe_head(args, network) if args.init_head else None
    for name in ("head.weight", "head.bias"):
        state[name] = state[name].clone()
        state[name][0] = head[name][0]
        if probe is not None:
            state[name][1:] = probe[name]
    model.load_state_dict(state)
    return checkpoint["normalisation"]


def probe_head(args, network):
    """--init-head's 7-class head, checked to have been trained on exactly `network` (--init-from's,
    frozen): a head read on other features would start the classes from noise."""
    probe, checkpoint = load_checkpoint(args.init_head)
    if checkpoint["task"] != "multiclass" or checkpoint["num_outputs"] != len(DX_CODES):
        fail(args.init_head, f"is a {checkpoint['task']} model with {checkpoint['num_outputs']} logits; --init-head "
             "needs a 7-class one")
    body, head = split_head(probe.state_dict())
    if body.keys() != network.keys() or not all(torch.equal(body[k].float(), network[k].float()) for k in body):
        fail(args.init_head, f"was not trained on {args.init_from}'s network frozen (train.py --frozen-from)")
    return head


def train_one_epoch(model, images, metadata, targets, order, criterion, optimizer, scheduler, scaler, augment, noise,
                    hue, shift, hide, normalisation, device, dtype, batch_size, epoch, epochs, show_progress,
                    low_side=None, frame=0.0):
    """One pass over `order` (this process's shard); returns (mean loss, images per second)."""
    model.train()
    if not all(p.requires_grad for p in model.parameters()):  # --frozen-from: all but the head stays as it was
        for name, module in getattr(model, "module", model).named_children():  # (DDP wraps the model in .module)
            if name != "head":
                module.eval()  # its batch-norm statistics and dropout as in inference
    total, seen, started = 0.0, 0, time.perf_counter()
    bar = tqdm(range(0, len(order), batch_size), desc=f"epoch {epoch + 1}/{epochs}", leave=False,
               disable=not show_progress)
    for start in bar:
        idx = order[start:start + batch_size]
        if len(idx) < 2:  # BatchNorm cannot train on a single image
            continue
        x = augment_batch(images[idx], augment, normalisation, noise, hue, shift, low_side, frame).to(
            device, non_blocking=True)
        y = batch_targets(criterion, targets[idx]).to(device, non_blocking=True)
        extra = {} if metadata is None else {"metadata": hide_metadata(metadata[idx], hide).to(device)}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = criterion(model(x, **extra).float(), y)
        optimisation_step(loss, optimizer, scaler, scheduler)
        total += loss.item() * len(idx)
        seen += len(idx)
        bar.set_postfix(loss=f"{total / seen:.4f}")
    return total / max(1, seen), seen / (time.perf_counter() - started)


def validate(model, images, metadata, rows, normalisation, device, task):
    """Validation probabilities and scores. The selection score is ROC-AUC of the malignancy
    probability (binary) or balanced accuracy over the 7 classes (multiclass)."""
    probs, class_probs = predict_probs(model, images, normalisation, device, task, metadata=metadata)
    labels = rows["malignant"].to_numpy()
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    scores = {"val_loss": float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))),  # unweighted
              "val_auc": ranking_metrics(labels, probs)["roc_auc"], "val_bal_acc": float("nan")}
    if class_probs is not None:
        scores["val_bal_acc"] = balanced_accuracy_7(rows["dx"], class_probs)
    # a network of both answers is chosen on both: the mean of the two (docs/fourth_edition.md)
    scores["val_score"] = {"multiclass": scores["val_bal_acc"], SHARED_TASK: (scores["val_auc"] + scores["val_bal_acc"])
                           / 2}.get(task, scores["val_auc"])
    return probs, class_probs, scores


def setup_processes(args):
    """(rank, world size, device). Under torchrun each process joins the group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, pick_device(args.device)
    use_cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), world, device


# ---------------------------------------------------------------------------------------------
# the run


def keep_segmenter(cache_key, run_dir):
    """The cache key with its segmenter, if any, named by a copy inside the model folder."""
    source, sha256 = cache_key.get("segmenter_model"), cache_key.get("segmenter_sha256")
    if not source:
        return cache_key
    kept = run_dir / "segmenter.pt"
    if not (kept.is_file() and file_digest(kept) == sha256):  # a resumed run has it already
        if not Path(source).is_file() or file_digest(source) != sha256:
            fail(source, "is not the segmenter the cache was built with (missing or changed); restore it or "
                 "rebuild the cache")
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(kept) as tmp:
            try:
                os.link(source, tmp)
            except OSError:  # another file system, or none that links
                shutil.copyfile(source, tmp)
    return {**cache_key, "segmenter_model": kept.name}


@one_line_errors
def main(args):
    rank, world, device = setup_processes(args)
    is_main = rank == 0
    if is_main:
        lock_output(args.run_dir)
    torch.manual_seed(args.seed + rank)  # augmentation differs between processes
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    args.loss = args.loss or ("ce" if args.task == "multiclass" else "wbce")
    if args.frozen_from and args.init_from:
        fail("--init-from", "and --frozen-from both name the network to start from; give one")
    if args.init_head and not args.init_from:
        fail("--init-head", "starts the classes of an --init-from network; give --init-from too")
    if args.init_from and args.task != SHARED_TASK:
        fail("--init-from", f"starts a --task {SHARED_TASK} network from a binary one; this run is --task {args.task}")
    if args.class_loss_weight != 1.0 and args.task != SHARED_TASK:
        fail(f"--class-loss-weight {args.class_loss_weight}", f"weighs the classes beside malignancy in --task "
             f"{SHARED_TASK}; this run is --task {args.task}")

    index, arrays = load_cache(args.cache)
    train_rows, val_rows = index[index["split"] == "train"], index[index["split"] == "val"]
    if args.val_source:
        sources = set(index["source"]) if "source" in index else set()
        if not set(args.val_source) <= sources:
            fail(args.cache / "index.csv", f"has no source {', '.join(sorted(set(args.val_source) - sources))} "
                 f"(its sources: {', '.join(sorted(map(str, sources))) or 'none'})")
        val_rows = val_rows[val_rows["source"].isin(args.val_source)]
    for name, rows in (("train", train_rows), ("val", val_rows)):
        if rows["malignant"].nunique() < 2:
            fail(args.cache / "index.csv", f"the {name} split needs benign and malignant images")
    input_size = args.input_size or arrays["full"].shape[1]
    train_images = torch.from_numpy(model_inputs(arrays, train_rows["row"], args.input, input_size))
    val_images = model_inputs(arrays, val_rows["row"], args.input, input_size)
    if args.general_sites and not args.metadata:
        fail("--general-sites", "reads the metadata's site words: it needs --metadata")
    train_metadata = torch.from_numpy(metadata_features(train_rows, args.general_sites)) if args.metadata else None
    val_metadata = metadata_features(val_rows, args.general_sites) if args.metadata else None
    sources = None
    if args.sampler == "source":
        if "source" not in train_rows or train_rows["source"].nunique() < 2:
            fail(args.cache / "index.csv", "--sampler source needs a dataset of several sources")
        sources = torch.from_numpy(pd.factorize(train_rows["source"])[0])

    criterion, num_outputs, targets = loss_and_targets(args, train_rows)
    model, normalisation = build_model(args.arch, num_outputs,
                                       args.pretrained and not (args.frozen_from or args.init_from),
                                       args.weights, args.metadata, views=2 if args.input == "both" else 1)
    if args.frozen_from:
        normalisation = frozen_network(model, args, input_size)
    if args.init_from:
        normalisation = initial_network(model, args, input_size)
    model = prepare_model(model, device)
    criterion = criterion.to(device)
    dtype = autocast_dtype(args.precision, device, args.arch)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    optimizer_class = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_class([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                weight_decay=args.weight_decay)
    per_process_batch = max(2, args.batch_size // world)
    epoch_size = args.epoch_size or len(train_images)
    steps_per_epoch = math.ceil(math.ceil(epoch_size / world) / per_process_batch)
    scheduler = cosine_with_warmup(optimizer, int(args.warmup_epochs * steps_per_epoch),
                                   args.epochs * steps_per_epoch)
    augment = make_augment(args.aug, input_size)
    noise, hue = (0.02, 0.02) if args.aug in ("full", "shift") else (0.0, 0.0)
    trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    cache_key = read_json(args.cache / "cache_key.json")
    if args.resume:
        last_path, model_path = args.run_dir / "last.pt", args.run_dir / "model.pt"
        if not last_path.is_file():
            fail(last_path, "nothing to resume")
        last = load_torch_file(last_path, "checkpoint")
        # before keep_segmenter replaces the run's segmenter.pt: weights trained on other images
        # would be resumed, and predict.py would then prepare images as they were not trained on
        trained_on = last.get("preprocess") or {}
        differing = sorted(k for k in {*trained_on, *cache_key} if k != "segmenter_model"
                           and trained_on.get(k) != cache_key.get(k))
        if trained_on and differing:
            fail(args.cache / "cache_key.json", f"is not the cache {args.run_dir} was trained on (differs in "
                 f"{', '.join(differing)}); resume with that cache, or train into another --run-dir")
    checkpoint_base = {
        "arch": args.arch, "num_outputs": num_outputs, "normalisation": normalisation, "task": args.task,
        "classes": {"multiclass": list(DX_CODES), SHARED_TASK: ["malignant", *DX_CODES]}.get(args.task,
                                                                                           ["benign", "malignant"]),
        "input": args.input, "input_size": input_size, "loss": args.loss, "metadata": args.metadata,
        "general_sites": args.general_sites,
        # how predict.py must prepare new images
        "preprocess": keep_segmenter(cache_key, args.run_dir) if is_main else None,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    history, best_score, best_loss, start_epoch, stale = [], -math.inf, math.inf, 0, 0
    best_state = None
    if args.resume:
        best = load_torch_file(model_path, "checkpoint (the best epoch, needed beside last.pt to resume)")
        try:
            best_state = best["model"]
            model.load_state_dict(best_state)  # only to check that it fits: the latest epoch's weights follow
            model.load_state_dict(last["model"])
            optimizer.load_state_dict(last["optimizer"])
            scheduler.load_state_dict(last["scheduler"])
            torch.set_rng_state(last["rng_state"])
            start_epoch, history, stale = last["epoch"] + 1, last["history"], last["stale_epochs"]
            best_score, best_loss = last["best_val_score"], last["best_val_loss"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            fail(last_path, f"does not fit this run ({args.arch}, {args.task}, {num_outputs} outputs): "
                 f"{type(e).__name__} {str(e).splitlines()[0][:120]}; resume with the settings it was trained "
                 "with, or train into another --run-dir")
        if is_main:
            print(f"resumed {args.run_dir} after epoch {start_epoch}")
    if is_main:
        args.run_dir.mkdir(parents=True, exist_ok=True)
        print(f"training {args.arch} ({args.task}, {args.loss}) on {len(train_images)} images "
              f"({int(train_rows['malignant'].sum())} malignant), validating on {len(val_images)}; {input_size}px "
              f"{args.input} input{' with metadata' if args.metadata else ''}, device {device}, {world} process(es), "
              f"{'fp32' if dtype is None else str(dtype).replace('torch.', '')}")

    for epoch in range(start_epoch, args.epochs):
        started = time.time()
        order = epoch_order(targets, args.sampler, args.seed, epoch, sources, args.epoch_size)[rank::world]
        train_loss, speed = train_one_epoch(trained, train_images, train_metadata, targets, order, criterion,
                                            optimizer, scheduler, scaler, augment, noise, hue, args.aug == "shift",
                                            args.hide_metadata,
                                            normalisation, device, dtype, per_process_batch, epoch=epoch,
                                            epochs=args.epochs, show_progress=is_main,
                                            low_side=args.resolution_aug, frame=args.frame_aug)
        stop = torch.zeros(1)
        if is_main:
            _, _, scores = validate(model, val_images, val_metadata, val_rows, normalisation, device, args.task)
            history.append({"epoch": epoch + 1, "train_loss": train_loss, **scores,
                            "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - started, 1),
                            "images_per_s": round(speed * world, 1)})
            row = history[-1]
            print(f"epoch {row['epoch']:3d}  train_loss {train_loss:.4f}  val_loss {row['val_loss']:.4f}  "
                  f"val_auc {row['val_auc']:.4f}" + (f"  val_bal_acc {row['val_bal_acc']:.4f}"
                                                     if args.task != "binary" else "") +
                  f"  {row['seconds']:.0f}s  {row['images_per_s']:.0f} img/s")
            # Ties in the score (common on small validation sets) go to the lower validation loss.
            if (row["val_score"], -row["val_loss"]) > (best_score, -best_loss):
                best_score, best_loss, stale = row["val_score"], row["val_loss"], 0
                best_state = copy.deepcopy(model.state_dict())
                save_checkpoint({**checkpoint_base, "model": best_state, "epoch": epoch + 1,
                                 "val_score": best_score}, args.run_dir / "model.pt")
            else:
                stale += 1
            save_checkpoint({**checkpoint_base, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "rng_state": torch.get_rng_state(),
                             "epoch": epoch, "best_val_score": best_score, "best_val_loss": best_loss,
                             "stale_epochs": stale, "history": history}, args.run_dir / "last.pt")
            write_csv(pd.DataFrame(history), args.run_dir / "history.csv")
            if args.patience is not None and stale >= args.patience:
                print(f"no better validation score for {stale} epochs: stopping early")
                stop[0] = 1
        if world > 1:
            dist.broadcast(stop, src=0)
        if stop.item():
            break

    if is_main:
        model.load_state_dict(best_state)
        probs, class_probs, scores = validate(model, val_images, val_metadata, val_rows, normalisation, device,
                                              args.task)
        val_out = val_rows[["image_id", "lesion_id", "dx"]].copy()
        val_out["label"], val_out["prob"] = val_rows["malignant"].to_numpy(), probs
        if class_probs is not None:
            for k, code in enumerate(DX_CODES):
                val_out[f"prob_{code}"] = class_probs[:, k]
        write_csv(val_out, args.run_dir / "val_probs.csv")
        write_json({"args": checkpoint_base["args"], "device": str(device), "processes": world,
                    "precision": "fp32" if dtype is None else str(dtype).replace("torch.", ""),
                    "criterion": repr(criterion), "n_train": len(train_images), "n_val": len(val_images),
                    "best_val_score": best_score, "cache_key": checkpoint_base["preprocess"],
                    "git_commit": git_commit(),
                    "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                 "torchvision": torchvision.__version__, "numpy": np.__version__}},
                   args.run_dir / "config.json")
        score_name = {"multiclass": "balanced accuracy", SHARED_TASK: "score (the mean of ROC-AUC and balanced "
                      "accuracy)"}.get(args.task, "ROC-AUC")
        print(f"best validation {score_name} {best_score:.4f}; wrote {args.run_dir}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_args())
