"""What two or more of the toolkit's scripts share, in sections: labels, command lines, files and
errors, image operations, segmentation, preparing an image, metadata and checkpoints, the learned
segmenter, model folders and the inference engine, the preprocess cache, running a network, training,
metrics and plots, site calibration. Nothing here runs on import.

Every script imports this file, so what it imports at the top costs every script's start-up: the
libraries that take a second or so are imported where they are used (torch 1.8 s, and networks.py
with it; scikit-learn 1.1 s; matplotlib, SciPy and scikit-image 0.3 to 0.4 s each), so that a
script pays only for what it runs, and the ONNX Runtime path of predict.py never imports torch."""
import argparse
import functools
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

# ---------------------------------------------------------------------------------------------
# labels

# HAM10000 diagnosis codes; malignant = melanoma, basal cell carcinoma, actinic keratosis/Bowen's.
DX_CODES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
MALIGNANT_DX = frozenset({"akiec", "bcc", "mel"})
# the 7 class probabilities' columns of every probability file (val_probs.csv, test_probs.csv, predictions.csv)
CLASS_COLUMNS = [f"prob_{code}" for code in DX_CODES]
# Columns every metadata.csv has (fetch_data.py writes them, preprocess.py reads them).
METADATA_COLUMNS = ("image_id", "filename", "lesion_id", "dx", "malignant", "split")
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def is_malignant(dx):
    return int(dx in MALIGNANT_DX)


# ---------------------------------------------------------------------------------------------
# command lines


class ArgumentParser(argparse.ArgumentParser):
    """argparse that fails the toolkit's way: one line naming the flag and the problem, exit
    status 1 (argparse's own way is a usage block and status 2). --help is unchanged."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message):
        raise SystemExit(f"error: {message}")


def number_in(kind, low=None, high=None, low_open=False):
    """An argparse type: a finite number of `kind` (int or float) in [low, high] (low excluded with
    low_open), so that an out-of-range flag ends at parsing, before any work, naming the flag."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        too_low = low is not None and (value <= low if low_open else value < low)
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            bounds = f"{'above' if low_open else 'at least'} {low}" if high is None else \
                f"in {'(' if low_open else '['}{low}, {high}]" if low is not None else f"at most {high}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {bounds}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


# ---------------------------------------------------------------------------------------------
# files and errors


def shown(path):
    """A path as text that can always be printed or written to a CSV: bytes that are not UTF-8
    (a file name from another system) appear as \\xNN escapes instead of failing the write."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


class ToolkitError(Exception):
    """A problem that ends the work asked of a file (an image, a table, a checkpoint, a folder, a
    server's address): `path` names it, `problem` says what is wrong, in words a user can act on.
    A script's main prints it as one line, "error: <path>: <problem>", and ends with status 1
    (one_line_errors); the page shows it beside the file; a notebook sees an ordinary exception."""

    def __init__(self, path, problem):
        super().__init__(path, problem)  # as raised: pickled whole across preprocess.py's worker processes
        self.path, self.problem = shown(path), problem

    def __str__(self):
        return f"{self.path}: {self.problem}"


def fail(path, problem):
    """Stop the work with a ToolkitError that names the file and the problem."""
    raise ToolkitError(path, problem)


def one_line_errors(main):
    """A script's main, which ends on a ToolkitError with its one line ("error: <path>: <problem>")
    on standard error and exit status 1, never a traceback."""

    @functools.wraps(main)
    def main_of_script(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ToolkitError as e:
            raise SystemExit(f"error: {e}") from None

    return main_of_script


def check_writable(folder):
    """End at the start, not after the work, when outputs cannot be written into folder."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        fail(folder, f"cannot be written ({e.strerror or e})")


# An id read from a file or a server becomes part of a file name only when it is letters, digits,
# '.', '_' and '-', starting with a letter or digit: never a separator, '..' or an absolute path.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_names(df, path):
    """End naming the file and the row where an image_id could not be a file name, or a filename
    or mask is not a relative path that stays inside its folder: such values never become paths."""
    for row, image_id in enumerate(df["image_id"].astype(str), start=2):  # line 1 is the header
        if not SAFE_NAME.fullmatch(image_id):
            fail(path, f"line {row}: image_id {image_id!r} cannot be a file name "
                 "(letters, digits, '.', '_' and '-' only)")
    for column in ("filename", "mask"):
        for row, filename in enumerate(df[column] if column in df else [], start=2):
            if not isinstance(filename, str):  # an empty mask cell: no mask
                continue
            parts = filename.replace("\\", "/").split("/")
            if filename.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
                fail(path, f"line {row}: {column} {filename!r} leaves its folder; give a path relative to it")


_HELD_LOCKS = {}  # lock file -> its open handle: a lock lasts as long as the process, and dies with it


def lock_output(folder):
    """Claim an output folder for this run: a second run writing to the same folder (two `make all`
    on one dataset, two trainings into one model folder) ends at once with one line instead of
    interleaving its files with the first's. The lock file lies beside the folder, which may be
    replaced whole; the operating system releases it when the process ends, however it ends."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): runs are not guarded
        return
    folder = Path(folder).absolute()
    lock_path = folder.with_name(f".{folder.name}.lock")
    if lock_path in _HELD_LOCKS:  # this process holds it already (one step after another, as in the tests)
        return
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+")
    except OSError as e:
        fail(folder, f"cannot be written ({e.strerror or e})")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        fail(folder, "is being written by another run now; wait for it to end, or write elsewhere")
    _HELD_LOCKS[lock_path] = handle


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds,
    so a crash never leaves a half-written output. The temporary name keeps the suffix so that
    writers which infer the format from it (matplotlib, numpy) still do the right thing."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(path.parent, f"cannot be created ({e.strerror or e})")
    tmp = path.with_name(f".tmp{os.getpid()}.{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:  # a full disk or a read-only folder: one line, and the old file, if any, stays
        fail(path, f"could not be written ({e.strerror or e})")
    finally:
        if tmp.exists():
            tmp.unlink()


def replace_folder(built, folder):
    """Move a finished folder into place whole: the old one (if any) out of the way first, removed
    last, so a reader finds the old folder or the new one, never a mix."""
    built, folder = Path(built), Path(folder)
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old{os.getpid()}")
        folder.rename(old)
        built.rename(folder)
        shutil.rmtree(old)
    else:
        built.rename(folder)


def write_csv(df, path, **to_csv):
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, **to_csv)


def write_json(obj, path):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def write_table_and_markdown(table, text, out):
    """A benchmark's table as out.csv and its Markdown text as out.md, then the text printed."""
    write_csv(table, out.with_suffix(".csv"))
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(text)
    print(text)


def read_json(path):
    path = Path(path)
    if not path.is_file():
        fail(path, "file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(path, f"not valid JSON ({e})")


def read_csv(path, required_columns=()):
    """Read a CSV or end with one line naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        fail(path, "file not found")
    try:
        df = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        fail(path, f"not a readable CSV ({str(e).splitlines()[0]})")
    missing = [c for c in required_columns if c not in df.columns]
    if missing:
        fail(path, f"missing column(s) {', '.join(missing)}")
    if len(df) == 0:
        fail(path, "has no rows")
    return df


def read_probs(path, columns=("label", "prob")):
    """A probability CSV (val_probs.csv, test_probs.csv) whose every value is checked: labels 0 or
    1, probabilities numbers in [0, 1]; otherwise one line naming the file, column and line."""
    df = read_csv(path, columns)
    for column in columns:
        if column not in ("label", "prob") and not column.startswith("prob_"):
            continue
        values = pd.to_numeric(df[column], errors="coerce")
        valid = values.isin([0, 1]) if column == "label" else values.between(0, 1)
        if not valid.all():
            row = int(np.flatnonzero(~valid.to_numpy())[0])
            fail(path, f"line {row + 2}: {column} {df[column].iloc[row]!r} is not "
                 + ("0 or 1" if column == "label" else "a probability in [0, 1]"))
        df[column] = values
    return df


def is_finite_number(value):
    """A JSON number that is finite (true and false are no numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_thresholds(folder):
    """The operating points of thresholds.json: a dict of names to finite numbers, or one line."""
    path = Path(folder) / "thresholds.json"
    thresholds = read_json(path)
    thresholds = thresholds.get("thresholds") if isinstance(thresholds, dict) else None
    if not isinstance(thresholds, dict) or not thresholds:
        fail(path, "holds no 'thresholds' object of operating points; run threshold.py")
    for name, value in thresholds.items():
        if not is_finite_number(value):
            fail(path, f"threshold '{name}' is {value!r}, not a number")
    return thresholds


def read_class_biases(folder):
    """thresholds.json's class_biases (threshold.py --class-biases): the seven class-logit biases in
    DX_CODES order, or None where the file has none; anything else ends with one line."""
    path = Path(folder) / "thresholds.json"
    biases = read_json(path).get("class_biases")
    if biases is None:
        return None
    if not isinstance(biases, dict) or set(biases) != set(DX_CODES) or not all(map(is_finite_number,
                                                                                   biases.values())):
        fail(path, f"'class_biases' must give a number for each of {', '.join(DX_CODES)}")
    return np.array([float(biases[code]) for code in DX_CODES])


def chosen_with_tta(folder):
    """Whether thresholds.json's points were chosen on test-time-augmented probabilities: a model is
    then read the same way by default (threshold.py records it; older files chose on plain ones)."""
    tta = read_json(Path(folder) / "thresholds.json").get("tta", False)
    if not isinstance(tta, bool):
        fail(Path(folder) / "thresholds.json", f"'tta' is {tta!r}, not true or false")
    return tta


def default_operating_point(thresholds):
    """recall_bound where the thresholds have it: the screening point whose recall held on new
    images (docs/second_edition.md); recall_target for older files, else the first point."""
    return next((name for name in ("recall_bound", "recall_target") if name in thresholds), next(iter(thresholds)))


def image_files(paths):
    """(the image files among paths and in the folders among them, sorted within each folder; the
    paths that do not exist), for the caller to report or refuse."""
    files, missing = [], []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            files.append(path)
        else:
            missing.append(path)
    return files, missing


def files_by_stem(root):
    """Every image file below root, at any depth, by its name without the suffix: paths relative to root."""
    return {p.stem: p.relative_to(root).as_posix() for p in sorted(Path(root).rglob("*"))
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}


def masks_by_image_id(folder, image_ids):
    """The mask file below folder of each image id that has one, relative to folder: named <id> or
    <id>_<anything> (ISIC's _segmentation, PH2's _lesion), the longest id a name starts with."""
    ids = set(image_ids)
    found = {}
    for stem, path in files_by_stem(folder).items():
        pieces = stem.split("_")
        for k in range(len(pieces), 0, -1):
            if "_".join(pieces[:k]) in ids:
                found.setdefault("_".join(pieces[:k]), path)
                break
    return found


def file_digest(path, algorithm="sha256"):
    """Hex digest of a file, read in 1 MiB blocks (multi-GB zips fit in no memory)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------
# image operations (arrays in, arrays out; images are RGB uint8)


# Smaller than this on a side, or longer than MAX_ASPECT times its width, an image holds no
# lesion to diagnose (a 1x1 pixel, a 4000x1 strip): it is reported and skipped.
MIN_IMAGE_SIDE = 8
MAX_ASPECT = 10


# Dermoscopes give at most about 25 megapixels; a file that says it holds more is refused before it
# is decoded: a 30,000 x 30,000 PNG of 2.7 MB took 37 s and 6 GB to decode.
MAX_MEGAPIXELS = 50


def header_size(path, data):
    """(width, height) an image file's header gives, read without decoding it (Pillow reads the
    header alone); (pixels, None) where Pillow tells only the pixel count; None where Pillow does
    not know the format (OpenCV then decides)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Image.DecompressionBombError as e:  # over twice Pillow's own limit: only its pixel count is told
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        return (int(pixels.group(1)) if pixels else math.inf, None)
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def decode_image(path, flags):
    """An image decoded from the file's bytes, which Python reads: OpenCV never opens the path
    (cv2.imread crashes on names that are not UTF-8). Ends naming the file if it is none, or if its
    header gives more than MAX_MEGAPIXELS (before any decoding: bounded work per image)."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as e:
        fail(path, f"cannot be read ({e.strerror or e})")
    size = header_size(path, data.tobytes()) if data.size else None
    pixels = None if size is None else size[0] * (size[1] or 1)
    if pixels is not None and pixels > MAX_MEGAPIXELS * 1e6:
        fail(path, (f"{size[0]}x{size[1]} px" if size[1] else "its header") + f" ({pixels / 1e6:.0f} megapixels) is "
             f"over the {MAX_MEGAPIXELS}-megapixel limit (dermoscopes give at most about 25): scale it down first")
    image = cv2.imdecode(data, flags) if data.size else None
    if image is None:
        fail(path, "not a readable image")
    # libjpeg decodes a cut-off JPEG with only a warning, grey where the data ends
    if data[:2].tobytes() == b"\xff\xd8" and b"\xff\xd9" not in data[-64:].tobytes():
        fail(path, "a truncated JPEG (it ends before its end-of-image marker, so part of it would be grey): "
             "copy or take it again")
    return image


def read_rgb(path):
    """An RGB uint8 image, or the end naming the file when it is unreadable or too degenerate to
    hold a lesion."""
    bgr = decode_image(path, cv2.IMREAD_COLOR)
    h, w = bgr.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE or max(h, w) > MAX_ASPECT * min(h, w):
        fail(path, f"{w}x{h} px holds no lesion to diagnose (needs {MIN_IMAGE_SIDE} px a side or more "
             f"and an aspect ratio within {MAX_ASPECT}:1)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_mask(path):
    """A mask image as a boolean array (any non-zero pixel is inside)."""
    return decode_image(path, cv2.IMREAD_GRAYSCALE) > 0


def write_png(path, array):
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    encoded, png = cv2.imencode(".png", array)
    if not encoded:
        fail(path, "could not be encoded as PNG")
    with atomic_path(path) as tmp:
        tmp.write_bytes(png.tobytes())  # Python writes any path; cv2.imwrite does not


def resize_to(image, side):
    """Resize to side x side. HAM10000 models are trained on squashed squares (the 600x450
    originals are resized whole), so the aspect ratio is not kept."""
    interpolation = cv2.INTER_AREA if image.shape[0] > side else cv2.INTER_LINEAR
    return cv2.resize(image, (side, side), interpolation=interpolation)


# preprocess.py --hair-removal: "on" inpaints hair-shaped structures only; "legacy" inpaints every
# thin dark structure, as the first study's caches (cache keys without the field) did; "off" none.
HAIR_REMOVAL_MODES = ("on", "off", "legacy")


def dark_line_mask(gray):
    """Thin dark structures: DullRazor's first step. The black-hat transform (closing minus image)
    with a kernel wider than a hair responds to hairs, but just as much to pigment network, dots,
    globules and streaks."""
    # DullRazor used a 17 px kernel on 600x450 images: about 1/26 of the short side.
    k = max(3, int(round(min(gray.shape) / 26)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    return cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, kernel) > 12, kernel


# What a hair looks like, in shares of the image's short side (set by eye and by the share inpainted
# on ham10000_224 and ISIC 2017 train images; at 224 px: straight for 18 px, runs of 34 px or more
# between ends, 7 px wide or less).
HAIR_STRAIGHT_RUN = 0.08
HAIR_MIN_RUN = 0.15
HAIR_MAX_WIDTH = 1 / 30
# Skeleton length at most this many times the box diagonal: a hair, or a few crossing, spans its
# box; a patch of pigment network folds far more line into the same box.
HAIR_MAX_FOLDING = 3.0


def line_kernels(length, n_angles=12):
    """One-pixel line structuring elements of `length` at n_angles orientations over 180 degrees."""
    kernels, centre = [], (length - 1) / 2
    for angle in np.arange(n_angles) * np.pi / n_angles:
        dx, dy = np.cos(angle) * centre, np.sin(angle) * centre
        kernel = np.zeros((length, length), np.uint8)
        cv2.line(kernel, (round(centre - dx), round(centre - dy)), (round(centre + dx), round(centre + dy)), 1, 1)
        kernels.append(kernel)
    return kernels


def hair_shaped(straight, short):
    """The connected structures of a mask of straight runs that are shaped like hair: the skeleton
    runs long between ends (dots, globules and streaks are short), thin (area per skeleton pixel),
    spanning its box rather than folding into a mesh, and with no hole unless it spans half the
    image (crossing hairs; pigment network is a mesh of small holes)."""
    from skimage import measure, morphology
    labels = measure.label(straight, connectivity=2)
    n = labels.max()
    if n == 0:
        return np.zeros(straight.shape, bool)
    skeleton = morphology.skeletonize(straight.astype(bool))
    neighbours = cv2.filter2D(skeleton.astype(np.uint8), -1, np.ones((3, 3), np.float32),
                              borderType=cv2.BORDER_CONSTANT)
    ends = skeleton & (neighbours == 2)  # the pixel itself and one neighbour
    length = np.bincount(labels[skeleton], minlength=n + 1)
    n_ends = np.bincount(labels[ends], minlength=n + 1)
    area = np.bincount(labels.ravel(), minlength=n + 1)
    regions = {region.label: region for region in measure.regionprops(labels)}  # lazy: computed where read
    box = np.array([regions[k].bbox for k in range(1, n + 1)])
    diagonal = np.r_[1.0, np.hypot(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1])]
    hair = ((length / np.maximum(n_ends / 2, 1) >= HAIR_MIN_RUN * short)
            & (area / np.maximum(length, 1) <= HAIR_MAX_WIDTH * short)
            & (length <= HAIR_MAX_FOLDING * diagonal))
    hair[0] = False
    # a hole rules out only a structure shorter than half the image: the Euler number, the slowest
    # of these figures, is read for those candidates alone
    for k in np.flatnonzero(hair & (diagonal < 0.5 * short)):
        hair[k] = regions[k].euler_number > 0
    return hair[labels]


def hair_mask(rgb):
    """DullRazor's two steps: thin dark structures, then only those shaped like hair.

    Straight runs first: openings with line elements in 12 orientations, like DullRazor's linear
    closings. Pigment network, dots, globules and streaks hold no long straight line, and a hair
    that crosses the network is cut loose from it. The runs are looked for twice, in the dark
    structures as found and in a band 1 px wider, where a one-pixel hair that bends still holds
    runs, but a hair crossing dense network merges with it; what either finds hair-shaped is hair.
    Near-black vignette corners and the image's outermost pixels, where frame lines run, are no hair."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    short = min(gray.shape)
    candidates, kernel = dark_line_mask(gray)
    # the vignette is a wide near-black field; opening keeps it and drops black hairs, thinner than the kernel
    vignette = cv2.morphologyEx((gray < 40).astype(np.uint8), cv2.MORPH_OPEN, kernel)
    candidates &= ~cv2.dilate(vignette, kernel).astype(bool)
    candidates[:2], candidates[-2:], candidates[:, :2], candidates[:, -2:] = False, False, False, False
    candidates = candidates.astype(np.uint8)
    square = np.ones((3, 3), np.uint8)
    lines = line_kernels(max(5, round(HAIR_STRAIGHT_RUN * short) | 1))
    hair = np.zeros(gray.shape, bool)
    for dark in (candidates, cv2.dilate(candidates, square)):
        straight = np.zeros_like(candidates)
        for line in lines:
            straight |= cv2.morphologyEx(dark, cv2.MORPH_OPEN, line)
        hair |= hair_shaped(straight & candidates, short)
    # back to the hair's full width (the openings trim its bends), then a margin for inpainting
    hair = cv2.dilate(hair.astype(np.uint8), square) & candidates
    return cv2.dilate(hair, square).astype(bool)


def legacy_hair_mask(rgb):
    """The first study's hair mask: every thin dark structure, dilated (pigment network included)."""
    candidates, _ = dark_line_mask(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    return cv2.dilate(candidates.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)


def remove_hair(rgb, mode="on"):
    """Return (image with hairs inpainted, hair mask) for a --hair-removal mode."""
    if mode not in HAIR_REMOVAL_MODES:
        raise ValueError(f"unknown hair removal mode {mode!r}")
    mask = np.zeros(rgb.shape[:2], bool) if mode == "off" else hair_mask(rgb) if mode == "on" else \
        legacy_hair_mask(rgb)
    if not mask.any():
        return rgb.copy(), mask
    clean = cv2.inpaint(rgb, mask.astype(np.uint8), 3, cv2.INPAINT_TELEA)
    return clean, mask


# ---------------------------------------------------------------------------------------------
# segmentation


# How much a component loses for each share of the image border it covers. 2 removed the
# shading rings picked on HAM10000 overlay sheets and left PH2's Dice unchanged (0.907 vs 0.905).
BORDER_PENALTY = 2.0
# A lesion mask covering less or more than this share of the image is no plausible lesion.
PLAUSIBLE_AREA = (0.005, 0.95)


def lesion_mask(rgb):
    """Classical lesion segmentation. Returns (mask, plausible).

    The blue channel (pigment absorbs blue most, so lesion and skin differ most there: on PH2 it
    scored a mean Dice of 0.91 where grayscale scored 0.78), smoothing, Otsu, morphological
    closing, small-object removal; then the component a dermatologist would call the lesion:
    large and near the centre, with its holes filled. Components in the dark dermatoscope
    corners are not the lesion. When nothing plausible is found the whole image is returned with
    plausible=False, so callers can flag the row."""
    from scipy import ndimage
    from skimage import measure, morphology
    from skimage.filters import threshold_otsu

    h, w = rgb.shape[:2]
    sigma = max(1.0, min(h, w) / 100)
    blue = cv2.GaussianBlur(rgb[..., 2], (0, 0), sigma)
    gray = cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (0, 0), sigma)
    # The vignette of the dermatoscope is near-black; leaving it out of Otsu's histogram
    # keeps the threshold between lesion and skin rather than between skin and black corners.
    field = gray > 20
    if field.sum() < 0.2 * h * w:
        field[:] = True
    dark = (blue < threshold_otsu(blue[field])) & field
    radius = max(1, min(h, w) // 60)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    dark = cv2.morphologyEx(dark.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    dark = morphology.remove_small_objects(dark, max_size=int(0.002 * h * w))

    labels = measure.label(dark)
    best, best_score = None, 0.0
    half_diagonal = np.hypot(h / 2, w / 2)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    for region in measure.regionprops(labels):
        cy, cx = region.centroid
        centre_distance = np.hypot(cy - h / 2, cx - w / 2) / half_diagonal
        if centre_distance > 0.6:  # a corner or edge blob, not a lesion a user centred
            continue
        # Shading and vignettes hug the image border; a lesion runs off it along one side at most.
        on_border = np.mean(border == region.label)
        # A region along half the border or more is no candidate: when nothing else is left the
        # image is flagged (a lesion filling the frame then uses the whole image, as it should).
        score = region.area * (1.0 - centre_distance) * max(0.0, 1.0 - BORDER_PENALTY * on_border)
        if score > best_score:
            best, best_score = region.label, score
    if best is None:
        return np.ones((h, w), bool), False
    mask = ndimage.binary_fill_holes(labels == best)  # regression areas inside are lesion too
    if not PLAUSIBLE_AREA[0] <= mask.mean() <= PLAUSIBLE_AREA[1]:
        return np.ones((h, w), bool), False
    return mask, True


CROP_FITS = ("inside", "pad")


def crop_box(mask, margin=0.15, fit="inside"):
    """Square box (x0, y0, x1, y1) around the lesion's outer contour, widened by `margin`
    of its side so the border and some skin stay in view. fit "inside" keeps the box inside the
    image, so a lesion wider than the image's short side loses its edges; "pad" centres it on the
    lesion, beyond the image where need be (cut_box fills the outside with black)."""
    h, w = mask.shape
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return 0, 0, w, h
    x, y, bw, bh = cv2.boundingRect(max(contours, key=cv2.contourArea))
    side = int(round(max(bw, bh) * (1 + 2 * margin)))
    if fit == "pad":
        x0, y0 = int(round(x + bw / 2 - side / 2)), int(round(y + bh / 2 - side / 2))
        return x0, y0, x0 + side, y0 + side
    side = min(side, h, w)
    x0 = int(np.clip(x + bw / 2 - side / 2, 0, w - side))
    y0 = int(np.clip(y + bh / 2 - side / 2, 0, h - side))
    return x0, y0, x0 + side, y0 + side


def cut_box(rgb, box):
    """The image inside box (x0, y0, x1, y1), black where the box reaches beyond the image (as a
    dermatoscope's vignette is)."""
    x0, y0, x1, y1 = box
    h, w = rgb.shape[:2]
    out = np.zeros((y1 - y0, x1 - x0, *rgb.shape[2:]), rgb.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    return out


def apply_mask(rgb, mask):
    """Black out everything outside the lesion, as the reference study did."""
    return rgb * mask[..., None].astype(rgb.dtype)


COLOUR_CONSTANCY = ("none", "shades_of_gray")


def shades_of_gray(rgb, p=6):
    """Shades of Gray colour constancy (Finlayson and Trezzi, 2004; p = 6 as the ISIC 2018 and 2019
    winners used): the light's colour is estimated as each channel's Minkowski p-mean, and the
    channels are scaled so that it becomes neutral grey of the same brightness. Another
    dermatoscope's colour cast then looks like HAM10000's neutral light."""
    image = rgb.astype(np.float32)
    light = np.power(np.mean(np.power(image, p), axis=(0, 1)), 1 / p)
    gains = light.mean() / np.maximum(light, 1e-6)
    return np.clip(image * gains, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# preparing an image: what preprocess.py caches, and what predict.py does to a new photo

# Two sizes, two names: a cache's images are cache_size pixels square (preprocess.py --cache-size,
# 224 by default), and a network reads them resized to its input_size (train.py --input-size, 160
# for the reference model); the segmenter's own input_size is its (width, height). Files written
# before the names were two call either "img_size": read back by the functions below.
def size_named(fields, name):
    """A cache key's or checkpoint's fields with its "img_size" under today's name ("cache_size" or
    "input_size"), in its place; fields already so named are returned as they are."""
    if name in fields or "img_size" not in fields:
        return fields
    return {(name if key == "img_size" else key): value for key, value in fields.items()}


def cache_size(cache_key):
    """The side of a cache's square images, from its cache_key.json (or a checkpoint's "preprocess")."""
    return size_named(cache_key, "cache_size")["cache_size"]


def with_input_size(checkpoint):
    """A classifier's checkpoint (or its fields in onnx.json) with its network's size as "input_size",
    however it was written."""
    return size_named(checkpoint, "input_size")


def preprocess_settings(cache_key):
    """The arguments of preprocess_image that a cache was built with, from its cache_key.json (a
    model's checkpoint holds its training cache's). Keys written before hair removal was a setting
    used the legacy hair mask; before the segmenter was, the classical one; before colour constancy
    was, none; a key without crop_fit, a crop inside the image."""
    return {"cache_size": cache_size(cache_key), "work_size": cache_key["work_size"],
            "crop_margin": cache_key["crop_margin"], "crop_fit": cache_key.get("crop_fit", "inside"),
            "hair_removal": cache_key.get("hair_removal", "legacy"),
            "segmenter": cache_key.get("segmenter_model"), "segmenter_sha256": cache_key.get("segmenter_sha256"),
            "colour_constancy": cache_key.get("colour_constancy", "none")}


def preprocessing_differences(settings, reference):
    """The preprocess_settings that differ between two caches (or a cache and a model), as
    "name value (model: value)" strings. The segmenter's path is no difference: the same file may
    lie in two folders, and its SHA-256 says whether it is the same."""
    return [f"{k} {settings[k]} (model: {reference[k]})" for k in reference
            if k != "segmenter" and settings[k] != reference[k]]


def check_preprocessing(cache, models):
    """Images are scored only as their model's training images were prepared: a cache built with
    other settings (hair removal, sizes, crop margin) would shift every probability unnoticed."""
    cache_settings = preprocess_settings(read_json(cache / "cache_key.json"))
    for _, checkpoint in models:
        differ = preprocessing_differences(cache_settings, preprocess_settings(checkpoint["preprocess"]))
        if differ:
            fail(cache / "cache_key.json", f"was built with other preprocessing than {checkpoint['args']['cache']}, "
                 f"the model's training cache: {', '.join(differ)}; rebuild it with preprocess.py and those settings")


def working_image(rgb, work_size):
    """(image scaled down to at most work_size on its longest side, the scale): hair removal and
    segmentation run at this resolution, whatever the camera's."""
    h, w = rgb.shape[:2]
    scale = min(1.0, work_size / max(h, w))
    if scale < 1:
        rgb = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    return rgb, scale


def cleaned_image(path, work_size, hair_removal="on"):
    """The first half of preprocess_image: (the image at its working resolution with hair removed,
    the hair mask, the scale). Ends naming the file where it cannot be read."""
    rgb, scale = working_image(read_rgb(path), work_size)
    clean, hair = remove_hair(rgb, hair_removal)
    return clean, hair, scale


def prepare_cleaned(cleaned, cache_size, crop_margin, segmenter=None, segmenter_sha256=None,
                    colour_constancy="none", crop_fit="inside", segmenter_onnx=None):
    """The second half of preprocess_image, for several cleaned_image results at once: a segmenter
    sees them in one forward pass (twice as fast as one by one on a CPU); segmenter_onnx: its ONNX
    file, run by ONNX Runtime."""
    unet = learned_lesion_masks([clean for clean, _, _ in cleaned], segmenter, segmenter_sha256, segmenter_onnx) \
        if segmenter is not None else [(None, False)] * len(cleaned)
    prepared = []
    for (clean, hair, scale), (mask, plausible) in zip(cleaned, unet):
        source = "unet"
        if not plausible:
            (mask, plausible), source = lesion_mask(clean), "classical"
        x0, y0, x1, y1 = box = crop_box(mask, crop_margin, crop_fit)
        if colour_constancy == "shades_of_gray":  # what the classifier sees; the masks come from the colours as taken
            clean = shades_of_gray(clean)
        prepared.append({
            "image": resize_to(clean, cache_size),
            "crop": resize_to(cut_box(clean, box), cache_size),
            "mask_small": (resize_to(mask.astype(np.uint8), cache_size) > 0).astype(np.uint8),
            "mask": mask.astype(np.uint8) * 255,
            "mask_area": float(mask.mean()), "hair_fraction": float(hair.mean()),
            "mask_ok": int(plausible), "mask_source": source,
            # the box in the original image's pixels, for users who crop the full-size image
            # (beyond its edges with crop_fit "pad")
            "crop_x0": round(x0 / scale), "crop_y0": round(y0 / scale),
            "crop_x1": round(x1 / scale), "crop_y1": round(y1 / scale),
        })
    return prepared


def preprocess_image(path, cache_size, work_size, crop_margin, hair_removal="on", segmenter=None,
                     segmenter_sha256=None, colour_constancy="none", crop_fit="inside"):
    """Everything preprocess.py does to one image, and predict.py to a new one: hair removal and
    segmentation at a working resolution, then the cached arrays and the index values. With a
    segmenter checkpoint the U-Net segments, and the classical recipe where its mask is implausible.
    Colour constancy, where asked, changes the cached images and crops, not the segmentation."""
    return prepare_cleaned([cleaned_image(path, work_size, hair_removal)], cache_size, crop_margin, segmenter,
                           segmenter_sha256, colour_constancy, crop_fit)[0]


# ---------------------------------------------------------------------------------------------
# metadata and checkpoints

# Clinical metadata a model may see beside the image (train.py --metadata). Never dx_type: it says
# how the diagnosis was made (histopathology for most malignant lesions) and so leaks the label.
SEXES = ("male", "female")
SITES = ("abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand", "lower extremity",
         "neck", "scalp", "trunk", "upper extremity")
# (name, first column, number of columns) of each field in the feature vector
METADATA_FIELDS = (("age", 0, 2), ("sex", 2, len(SEXES)), ("site", 2 + len(SEXES), len(SITES)))
METADATA_SIZE = sum(size for _, _, size in METADATA_FIELDS)


# The ISIC Archive's anatom_site_general words (ISIC 2019 and 2020, isic2020_dev) are more general
# than HAM10000's. With general_sites, each is read as the HAM10000 sites it covers, weighted by how
# often HAM10000's 10,015 images record each (the model's linear metadata layer then sees the
# frequency-weighted mean of what it learned for them): lever L6 of docs/third_edition.md, which
# did not pass its screen (isic2020_dev +0.005, panel +0.002), so by default such a word is read as
# site unknown, and counted by unknown_sites.
HAM10000_SITE_COUNTS = {"back": 2192, "trunk": 1404, "abdomen": 1022, "chest": 407, "face": 745, "neck": 168,
                        "scalp": 128, "ear": 56, "acral": 7, "foot": 319, "hand": 90, "genital": 48}
GENERAL_SITES = {"torso": ("back", "trunk", "abdomen", "chest"), "anterior torso": ("trunk", "abdomen", "chest"),
                 "posterior torso": ("back",), "lateral torso": ("trunk",),
                 "head/neck": ("face", "neck", "scalp", "ear"), "palms/soles": ("acral", "foot", "hand"),
                 "oral/genital": ("genital",)}
UNKNOWN_WORDS = ("", "nan", "none", "unknown")


def site_words(rows):
    """The localization column as lower-case words ('' where there is none)."""
    if "localization" not in rows:
        return np.full(len(rows), "", dtype=object)
    return rows["localization"].fillna("").astype(str).str.strip().str.lower().to_numpy()


def unknown_sites(rows, general_sites=False):
    """{word: images} of the site words a metadata model cannot read (read as site unknown)."""
    known = set(SITES) | set(UNKNOWN_WORDS) | (set(GENERAL_SITES) if general_sites else set())
    words = pd.Series(site_words(rows))
    return words[~words.isin(known)].value_counts().to_dict()


def unknown_sites_line(rows, general_sites=False):
    """One line naming the site words read as unknown, or None when every word is read."""
    unknown = unknown_sites(rows, general_sites)
    if not unknown:
        return None
    words = ", ".join(f"'{word}' ({n})" for word, n in sorted(unknown.items(), key=lambda kv: -kv[1]))
    return (f"{sum(unknown.values())} of {len(rows)} images name a site the model does not know, read as site "
            f"unknown: {words}")


def hidden_metadata(rows):
    """The rows with age, sex and site unknown: how a metadata model scores images that come without them."""
    return rows.assign(age=np.nan, sex=None, localization=None)


def metadata_features(rows, general_sites=False):
    """float32 (N, METADATA_SIZE) from a table's age, sex and localization columns: age standardised
    ((age - 50) / 20, about HAM10000's mean and spread) with a flag that it is known, sex and site
    one-hot. A missing column, an empty cell or 'unknown' leaves its field all zeros, which is also
    what a model sees for images without metadata. general_sites: the ISIC Archive's general site
    words (GENERAL_SITES) spread over the HAM10000 sites they cover (lever L6, not kept); by default
    they are read as unknown."""
    n = len(rows)
    features = np.zeros((n, METADATA_SIZE), np.float32)
    if "age" in rows:
        age = pd.to_numeric(rows["age"], errors="coerce").to_numpy(dtype=float)
        known = np.isfinite(age) & (age >= 0) & (age <= 120)
        features[known, 0] = (age[known] - 50) / 20
        features[known, 1] = 1
    for (_, first, _), column, values in ((METADATA_FIELDS[1], "sex", SEXES),
                                          (METADATA_FIELDS[2], "localization", SITES)):
        if column in rows:
            cells = rows[column].astype(str).str.strip().str.lower().to_numpy()
            for k, value in enumerate(values):
                features[cells == value, first + k] = 1
    if general_sites:
        first = METADATA_FIELDS[2][1]
        words = site_words(rows)
        for word, covered in GENERAL_SITES.items():
            weights = np.array([HAM10000_SITE_COUNTS[site] for site in covered], np.float32)
            for site, weight in zip(covered, weights / weights.sum()):
                features[words == word, first + SITES.index(site)] = weight
    return features


def hide_metadata(features, p):
    """Zero each field of each row with probability p (in training), so that the model learns to
    use a field when it is there and to do without it when it is not."""
    import torch
    features = features.clone()
    for _, first, size in METADATA_FIELDS:
        hidden = torch.rand(len(features)) < p
        features[hidden, first:first + size] = 0
    return features


def split_head(state):
    """(the network's weights, the head's) of a model's state dict: what a 7-class head trained on
    a frozen network (train.py --frozen-from) shares with that network's model, and what it adds."""
    network = {name: value for name, value in state.items() if not name.startswith("head.")}
    return network, {name: value for name, value in state.items() if name not in network}


def load_torch_file(path, what="state dict"):
    """A file of tensors (weights, a checkpoint), loaded with weights_only=True: no pickled code."""
    import torch
    if not Path(path).is_file():
        fail(path, f"{what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; all mean the same here
        fail(path, f"not a loadable {what} ({type(e).__name__})")


def save_checkpoint(checkpoint, path):
    """torch.save through memory: the same checkpoint gives the same bytes (torch names its archive
    after the file it writes, here a temporary one), and a full disk is an OSError of the write,
    which atomic_path reports in one line, not torch's own writer failing deep inside."""
    import torch
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def with_segmenter_beside(checkpoint, folder):
    """The checkpoint with the segmenter it names by a path relative to its own folder resolved
    there, so that a copied or moved folder keeps working."""
    preprocess = checkpoint.get("preprocess")
    if isinstance(preprocess, dict) and preprocess.get("segmenter_model"):
        beside = Path(folder) / preprocess["segmenter_model"]
        # older checkpoints name it relative to the folder training ran in
        if beside.is_file() or not Path(preprocess["segmenter_model"]).is_file():
            return {**checkpoint, "preprocess": {**preprocess, "segmenter_model": str(beside)}}
    return checkpoint


def load_checkpoint(path, shared_body=None):
    """Load a checkpoint written by train.py (or its compact copy, export_model.py) and rebuild its
    model (no pretrained download: the checkpoint holds every weight). A segmenter it names by a
    path relative to its own folder is resolved there, so a copied or moved folder keeps working.
    A head that export_model.py stored alone (it shares model.pt's network) takes every other
    weight from shared_body, that model's state dict."""
    path = Path(path)
    if not path.is_file():
        fail(path, "checkpoint not found")
    checkpoint = load_torch_file(path, "checkpoint")
    if not isinstance(checkpoint, dict):
        fail(path, f"holds a {type(checkpoint).__name__}, not a checkpoint of train.py")
    if checkpoint.get("shares_network_of") and isinstance(checkpoint.get("model"), dict):
        if shared_body is None:
            fail(path, f"holds a head alone; it is read beside the {checkpoint['shares_network_of']} whose "
                 "network it shares")
        checkpoint["model"] = {**split_head(shared_body)[0], **checkpoint["model"]}
    checkpoint = with_input_size(checkpoint)
    for key in ("arch", "num_outputs", "model", "normalisation", "input", "input_size", "task"):
        if key not in checkpoint:
            fail(path, f"checkpoint lacks '{key}'; was it written by train.py?")
    from networks import architecture, build_model
    architecture(checkpoint["arch"], path)  # a registered one, or one line
    if checkpoint["input"] not in INPUTS:
        fail(path, f"input {checkpoint['input']!r} is not one of {', '.join(INPUTS)}")
    if checkpoint["task"] not in TASKS:
        fail(path, f"task {checkpoint['task']!r} is not one of {', '.join(TASKS)}")
    for key in ("num_outputs", "input_size"):
        if isinstance(checkpoint[key], bool) or not isinstance(checkpoint[key], int) or checkpoint[key] < 1:
            fail(path, f"{key} {checkpoint[key]!r} is not a positive whole number")
    normalisation = checkpoint["normalisation"]
    if not (isinstance(normalisation, dict) and all(
            isinstance(normalisation.get(k), (list, tuple)) and len(normalisation[k]) == 3
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in normalisation[k])
            for k in ("mean", "std")) and min(normalisation["std"]) > 0):
        fail(path, f"normalisation {normalisation!r} is not a mean and a positive std for each of 3 channels")
    checkpoint = with_segmenter_beside(checkpoint, path.parent)
    model, _ = build_model(checkpoint["arch"], checkpoint["num_outputs"], pretrained=False,
                           metadata=checkpoint.get("metadata", False), views=2 if checkpoint["input"] == "both" else 1)
    try:
        model.load_state_dict(checkpoint["model"])  # fp16 weights of a compact copy are cast to the model's fp32
    except (RuntimeError, TypeError, AttributeError) as e:
        fail(path, f"weights do not fit {checkpoint['arch']} with {checkpoint['num_outputs']} output(s)"
             f"{' and metadata' if checkpoint.get('metadata') else ''} ({str(e).splitlines()[0][:120]})")
    model.eval()
    return model, checkpoint


# ---------------------------------------------------------------------------------------------
# the learned segmenter

SEGMENTER_ARCH = "unet_efficientnet_lite0"
# (width, height) the network sees: close to the 4:3 dermoscopy frame, and divisible by 32 for the
# encoder's five halvings
SEGMENTER_SIZE = (160, 128)
SEGMENTERS = ("classical", "unet")


def load_segmenter(path, sha256=None):
    """A segmenter checkpoint written by train_segmenter.py, in eval mode; with sha256, only the
    very file a cache was built with (another would segment differently)."""
    path = Path(path)
    if not path.is_file():
        fail(path, "segmenter checkpoint not found (train_segmenter.py writes it; make segmenter)")
    if sha256 is not None and file_digest(path) != sha256:
        fail(path, f"is not the segmenter this cache or model was made with (sha256 {sha256[:12]}...); "
             "restore that file or rebuild the cache")
    checkpoint = load_torch_file(path, "segmenter checkpoint")
    if not isinstance(checkpoint, dict) or checkpoint.get("arch") != SEGMENTER_ARCH or "model" not in checkpoint:
        fail(path, f"not a {SEGMENTER_ARCH} checkpoint of train_segmenter.py")
    threshold = checkpoint.get("mask_threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        fail(path, f"mask_threshold {threshold!r} is not a probability between 0 and 1")
    from networks import build_segmenter
    model, _ = build_segmenter(pretrained=False)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        fail(path, f"does not fit the {SEGMENTER_ARCH} network ({str(e).splitlines()[0][:120]})")
    return model.eval(), checkpoint


def segmenter_logits(model, images_uint8, normalisation):
    """Logits (N x H x W float32) of N x H x W x 3 uint8 images already at the network's size."""
    if isinstance(model, OnnxNetwork):
        return model.logits(images_uint8)[:, 0]
    import torch
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(to_model_tensor(images_uint8, normalisation).to(device)).float()[:, 0].cpu().numpy()


_LOADED_SEGMENTERS = {}  # (path, sha256, onnx path) -> (model, checkpoint)


def loaded_segmenter(path, sha256, onnx=None):
    """load_segmenter, once per process: every image of a run is segmented by the same model. With
    onnx (the path of its ONNX file, onnx_networks), ONNX Runtime runs it."""
    key = (str(path), sha256, str(onnx))
    if key not in _LOADED_SEGMENTERS or not Path(path).is_file():  # a file gone since is gone
        if onnx is None:
            from networks import for_inference
            model, checkpoint = load_segmenter(path, sha256)
            _LOADED_SEGMENTERS[key] = for_inference(model), checkpoint
        else:
            checkpoint = onnx_checkpoint(onnx, "segmenter.pt")
            if sha256 is not None and checkpoint["source_sha256"] != sha256:
                fail(path, f"is not the segmenter this cache or model was made with (sha256 {sha256[:12]}...); "
                     "restore that file or rebuild the cache")
            _LOADED_SEGMENTERS[key] = OnnxNetwork(onnx), checkpoint
    return _LOADED_SEGMENTERS[key]


def learned_lesion_masks(images, segmenter, segmenter_sha256, onnx=None):
    """The U-Net's lesion mask of each RGB image, at its size: the largest component of its
    probability above the checkpoint's mask_threshold (chosen on validation; 0.5 in older files),
    holes filled. Returns [(mask, plausible)] as lesion_mask does; an implausible mask (an area
    outside PLAUSIBLE_AREA) is for the caller to replace with the classical one."""
    from scipy import ndimage
    if not images:
        return []
    model, checkpoint = loaded_segmenter(segmenter, segmenter_sha256, onnx)
    small = np.stack([cv2.resize(rgb, tuple(checkpoint["input_size"]), interpolation=cv2.INTER_AREA) for rgb in images])
    cut = float(logit(checkpoint.get("mask_threshold", 0.5)))
    masks = []
    for rgb, logits in zip(images, segmenter_logits(model, small, checkpoint["normalisation"])):
        h, w = rgb.shape[:2]
        mask = cv2.resize(logits, (w, h), interpolation=cv2.INTER_LINEAR) > cut
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        if count < 2:
            masks.append((np.ones((h, w), bool), False))
            continue
        largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        mask = ndimage.binary_fill_holes(labels == largest)
        masks.append((mask, bool(PLAUSIBLE_AREA[0] <= mask.mean() <= PLAUSIBLE_AREA[1])))
    return masks


# ---------------------------------------------------------------------------------------------
# model folders and the inference engine: networks loaded once (ONNX Runtime or PyTorch), images classified

# export_model.py writes each network of a model folder as an ONNX file beside its weights, and
# records in ONNX_RECORD which weights file (by SHA-256) each was made from and how closely it
# matched PyTorch. ONNX Runtime ran EfficientNet-Lite0 2.2x and the U-Net 3x as fast as PyTorch's
# eager mode on 2 CPU cores, the same function to 1e-5 (docs/measured.md).
ENGINES = ("onnx", "torch")
ONNX_RECORD = "onnx.json"
ONNX_FILES = {"model.pt": "model.onnx", "classes.pt": "classes.onnx", "segmenter.pt": "segmenter.onnx"}


class OnnxNetwork:
    """A network exported to ONNX by export_model.py, run by ONNX Runtime. Its file reads images as
    they come, uint8 N x H x W x C RGB at the network's size (normalisation and layout are in the
    graph, so another language needs no more than the pixels), and a metadata model's features
    (METADATA_SIZE floats, zeros where unknown) as `metadata`. Built once, called many times."""

    def __init__(self, path, threads=None):
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.log_severity_level = 3  # warnings of the graph optimiser are not the user's business
        # its threads sleep between calls rather than spin: spinning, they took the cores from the
        # OpenCV and torch work between two networks (the classifier 10% slower with TTA on 2 cores)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in onnxruntime.get_available_providers()]
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own types for a bad file
            fail(path, f"not a loadable ONNX model ({str(e).splitlines()[0][:160]})")
        self.reads_metadata = any(i.name == "metadata" for i in self.session.get_inputs())

    def eval(self):
        return self

    def logits(self, images_uint8, metadata=None):
        """float32 logits of uint8 NHWC images; metadata: (N, METADATA_SIZE) or None (unknown)."""
        feeds = {"image": np.ascontiguousarray(images_uint8, dtype=np.uint8)}
        if self.reads_metadata:
            feeds["metadata"] = (np.zeros((len(images_uint8), METADATA_SIZE), np.float32) if metadata is None
                                 else np.ascontiguousarray(metadata, dtype=np.float32))
        return self.session.run(None, feeds)[0]


def onnx_checkpoint(onnx_path, weights_name):
    """The checkpoint fields (all but the weights) that export_model.py recorded for the weights
    file an ONNX file was made from, and that file's SHA-256 as source_sha256: what the ONNX
    engine reads instead of loading the weights with torch (a second of start-up)."""
    onnx_path = Path(onnx_path)
    entry = read_json(onnx_path.parent / ONNX_RECORD).get("networks", {}).get(weights_name, {})
    if not isinstance(entry.get("checkpoint"), dict):
        fail(onnx_path.parent / ONNX_RECORD, f"has no checkpoint fields for {weights_name}; export_model.py --onnx "
             f"{shown(onnx_path.parent)} writes them again")
    return {**with_input_size(entry["checkpoint"]), "source_sha256": entry.get("source_sha256")}


# Where the ONNX files of a model folder inside this toolkit lie when they are not beside its weights:
# made on each machine (make setup writes models/reference's here), so that the shipped folder
# holds its weights once and stays within its 25 MB
MACHINE_ONNX = Path(__file__).resolve().parent / "cache" / "onnx"


def onnx_dir(folder):
    """The folder that holds a model folder's ONNX files and ONNX_RECORD: the folder itself where
    they are there (what export_model.py writes), else, for a folder inside this toolkit, its place
    under MACHINE_ONNX."""
    folder = Path(folder)
    if (folder / ONNX_RECORD).is_file():
        return folder
    try:
        return MACHINE_ONNX / folder.resolve().relative_to(MACHINE_ONNX.parents[1])
    except ValueError:
        return folder


def onnx_networks(folder, engine=None):
    """{weights file name: its ONNX file} for the networks of a model folder that ONNX Runtime runs.
    engine "torch": none. "onnx": every network of the folder, or the end with one line naming
    what is missing. The files lie in onnx_dir(folder). None (the default): ONNX where the folder has current ONNX files and
    onnxruntime is installed, else PyTorch. An ONNX file made from other weights than the folder's
    (their SHA-256 differs from the record's) is never used."""
    if engine == "torch":
        return {}
    folder = Path(folder)
    where = onnx_dir(folder)
    record_path = where / ONNX_RECORD
    networks = [name for name in ONNX_FILES if (folder / name).is_file()]

    def unusable(problem):
        if engine == "onnx":
            fail(folder, f"{problem}; export_model.py --onnx {shown(folder)} writes its ONNX files, or use --engine "
                 "torch")
        return {}

    if "model.pt" not in networks:
        return unusable("holds no model.pt")
    if not record_path.is_file():
        return unusable("has no ONNX files")
    if importlib.util.find_spec("onnxruntime") is None:
        return unusable("needs onnxruntime (pip install -r requirements.txt) to run on ONNX Runtime")
    record = read_json(record_path).get("networks", {})
    found = {}
    for name in networks:
        entry = record.get(name)
        if not isinstance(entry, dict) or entry.get("onnx") != ONNX_FILES[name] \
                or not (where / ONNX_FILES[name]).is_file():
            return unusable(f"has no {ONNX_FILES[name]} for its {name}")
        if entry.get("source_sha256") != file_digest(folder / name):
            return unusable(f"{ONNX_FILES[name]} was made from another {name} than the folder's (its SHA-256 "
                            "differs)")
        found[name] = where / ONNX_FILES[name]
    return found


# Where predict.py looks for a model when given no --run: the reference model that ships with the
# toolkit (models/reference/MODEL_CARD.md), beside this file so that any working folder finds it.
REFERENCE_MODEL = Path(__file__).resolve().parent / "models" / "reference"


ENSEMBLE_FILE = "members.json"
# a model folder's 7-class model beside its malignancy model(s): which lesion it is, read from the
# same prepared images (one segmenter pass), while malignancy and its validated operating points
# stay the binary model's
CLASS_MODEL_FILE = "classes.pt"


def load_folder_models(folder, device, engine=None):
    """The models of a model folder, on `device` (a torch device or its name): its model.pt, or for an ensemble written by
    ensemble.py the model.pt of every member. Returns a list of (model, checkpoint). engine: as
    onnx_networks; where ONNX Runtime runs the folder, the model is an OnnxNetwork, and the first
    checkpoint's "onnx_networks" names every ONNX file of the folder (its classes and segmenter
    follow it)."""
    folder = Path(folder)
    ensemble_file = folder / ENSEMBLE_FILE
    onnx = {} if ensemble_file.is_file() and engine is None else onnx_networks(folder, engine)
    if onnx:  # neither torch's import nor its load of the weights: a second of start-up
        checkpoint = with_segmenter_beside(onnx_checkpoint(onnx["model.pt"], "model.pt"), folder)
        return [(OnnxNetwork(onnx["model.pt"]), {**checkpoint, "onnx_networks": onnx})]
    device = pick_device(device) if isinstance(device, str) else device
    if ensemble_file.is_file():
        members = read_json(ensemble_file).get("members")
        if not members:
            fail(ensemble_file, "lists no 'members'")
        model_files = [folder / member / "model.pt" for member in members]  # relative to the ensemble folder
    else:
        model_files = [folder / "model.pt"]
    from networks import for_inference
    models = []
    for path in model_files:
        model, checkpoint = load_checkpoint(path)
        models.append((prepare_model(for_inference(model), device), checkpoint))
    tasks = {checkpoint["task"] for _, checkpoint in models}
    if len(tasks) > 1:
        fail(ensemble_file, f"mixes tasks ({', '.join(sorted(tasks))}); an ensemble averages models of one task")
    return models


def load_class_model(folder, device, models):
    """The (model, checkpoint) that gives a run's 7 class probabilities: its classes.pt (a model
    folder's 7-class model, export_model.py --classes), else None, and then a 7-class run's own
    models give them (ensemble_probs). classes.pt must read the images as `models` do. Where it is
    a head on model.pt's frozen network (shares_network), the model is SharedHeads and the
    checkpoint says "shared": ensemble_probs then runs that network once for both answers."""
    path = Path(folder) / CLASS_MODEL_FILE
    if not path.is_file():
        return None
    onnx = models[0][1].get("onnx_networks", {}).get(CLASS_MODEL_FILE)
    if onnx is not None:  # export_model.py made it of what this function returns: both heads where shared
        checkpoint = with_segmenter_beside(onnx_checkpoint(onnx, CLASS_MODEL_FILE), folder)
        check_same_preparation(path, checkpoint, models[0][1])
        return OnnxNetwork(onnx), {**checkpoint, "shared": bool(checkpoint.get("shares_network_of"))}
    from networks import SharedHeads, for_inference
    model, checkpoint = load_checkpoint(path, shared_body=models[0][1]["model"])
    device = pick_device(device) if isinstance(device, str) else device
    if checkpoint["task"] != "multiclass":
        fail(path, f"is a {checkpoint['task']} model; {CLASS_MODEL_FILE} holds the 7-class one")
    check_same_preparation(path, checkpoint, models[0][1])
    if shares_network(checkpoint, models):  # one pass of model.pt's network gives both answers
        return SharedHeads(models[0][0], model.head.to(device)).eval(), {**checkpoint, "shared": True}
    return prepare_model(for_inference(model), device), checkpoint


def check_same_preparation(path, class_checkpoint, checkpoint):
    """A 7-class model (at `path`) beside a malignancy model's checkpoint reads the images exactly
    as it does: one preparation, one segmenter pass, for both answers."""
    if class_checkpoint.get("preprocess") is None or checkpoint.get("preprocess") is None:
        fail(path, "it or model.pt has no preprocessing settings; retrain it with this version of train.py")
    differences = preprocessing_differences(preprocess_settings(class_checkpoint["preprocess"]),
                                            preprocess_settings(checkpoint["preprocess"]))
    if differences:
        fail(path, f"was trained on differently prepared images than model.pt ({', '.join(differences)}); one "
             "folder reads one preparation")


def shares_network(class_checkpoint, models):
    """Whether a 7-class model is a head on the one malignancy model's frozen network (train.py
    --frozen-from): the same input, size and normalisation, and every weight but the head's equal."""
    if len(models) != 1:
        return False
    checkpoint = models[0][1]
    if checkpoint["task"] != "binary" or checkpoint["num_outputs"] != 1:  # SHARED_TASK reads one binary logit
        return False
    if not (checkpoint.get("metadata") and class_checkpoint.get("metadata")) or any(
            checkpoint[key] != class_checkpoint[key] for key in ("arch", "input", "input_size", "normalisation")):
        return False
    theirs, ours = split_head(checkpoint["model"])[0], split_head(class_checkpoint["model"])[0]
    return set(ours) == set(theirs) and all(
        ours[name].shape == theirs[name].shape and bool((ours[name].float() == theirs[name].float()).all())
        for name in ours)


NO_CLASSES = (f"gives malignancy only: no 7-class model ({CLASS_MODEL_FILE}, export_model.py --classes), "
              "and not a 7-class run")


def ensemble_probs(models, arrays, rows, device, tta=False, metadata=None, class_model=None):
    """(malignancy probabilities, class probabilities or None) of cache rows, the mean over the
    models, each fed the input form and size it was trained with, and metadata_features of the
    rows if it was trained with them (None: no metadata known). With class_model (load_class_model)
    the class probabilities are its own; malignancy stays the models'."""
    if class_model is not None and class_model[1].get("shared"):
        model, checkpoint = class_model
        images = model_inputs(arrays, rows, checkpoint["input"], checkpoint["input_size"])
        return predict_probs(model, images, checkpoint["normalisation"], device, SHARED_TASK, tta=tta,
                             metadata=metadata)
    probs, class_probs = [], []
    for model, checkpoint in models + ([class_model] if class_model is not None else []):
        images = model_inputs(arrays, rows, checkpoint["input"], checkpoint["input_size"])
        p, c = predict_probs(model, images, checkpoint["normalisation"], device, checkpoint["task"], tta=tta,
                             metadata=metadata if checkpoint.get("metadata") else None)
        probs.append(p)
        class_probs.append(c)
    if class_model is not None:
        return np.mean(probs[:-1], axis=0), class_probs[-1]
    return np.mean(probs, axis=0), None if class_probs[0] is None else np.mean(class_probs, axis=0)


def folder_preprocessing(models, run):
    """The one preprocessing every model of the run was trained with (preprocess_settings), its
    segmenter loaded: images from outside a cache are prepared with it."""
    settings = [checkpoint.get("preprocess") for _, checkpoint in models]
    if None in settings:
        fail(run, "a model has no preprocessing settings; retrain it with this version of train.py")
    settings = [preprocess_settings(s) for s in settings]
    if any(preprocessing_differences(s, settings[0]) for s in settings):
        fail(run, "its models were trained on differently prepared images; predict with each on its own")
    segmenter_onnx = models[0][1].get("onnx_networks", {}).get("segmenter.pt")
    if segmenter_onnx is not None and settings[0]["segmenter"] is not None \
            and Path(settings[0]["segmenter"]).resolve() == (Path(run) / "segmenter.pt").resolve():
        settings[0]["segmenter_onnx"] = segmenter_onnx  # the ONNX file of this very segmenter
    if settings[0]["segmenter"] is not None:  # missing or changed: one line now, not a skip per image
        loaded_segmenter(settings[0]["segmenter"], settings[0]["segmenter_sha256"], settings[0].get("segmenter_onnx"))
    return settings[0]


FILE_BATCH = 8  # images segmented and classified together; on 2 CPU cores 8 ran faster than 4, 16 or 32


def classify_files(models, settings, files, metadata, device, tta, class_model=None):
    """Image files through the run's preprocessing (folder_preprocessing) and models, a batch at a
    time. metadata: metadata_features, a row per file. Yields (index of the file, result) in order:
    result is a dict (prepared: preprocess_image's arrays, prob, class_probs or None) or, for a
    file that cannot be read or holds no lesion to diagnose, the one-line reason, so that the caller
    reports it and goes on with the rest."""
    for start in range(0, len(files), FILE_BATCH):
        readable, cleaned = [], []
        for i in range(start, min(start + FILE_BATCH, len(files))):
            try:
                cleaned.append(cleaned_image(files[i], settings["work_size"], settings["hair_removal"]))
                readable.append(i)
            except ToolkitError as e:
                yield i, e
        if not readable:
            continue
        # at the cache's size, then (model_inputs) the network's: a new photo is resized twice, as the
        # training images were; resized once, the reference model's probabilities moved by 0.018 on
        # average (0.16 at most) on 199 HAM10000 images and 0.047 on PH2's 100, and 8 and 6 decisions
        # changed (docs/measured.md): the networks learned the twice-resized pixels
        prepared = prepare_cleaned(cleaned, settings["cache_size"], settings["crop_margin"], settings["segmenter"],
                                   settings["segmenter_sha256"], settings["colour_constancy"], settings["crop_fit"],
                                   settings.get("segmenter_onnx"))
        arrays = {name: np.stack([p[key] for p in prepared])
                  for name, key in (("full", "image"), ("crop", "crop"), ("mask", "mask_small"))}
        probs, class_probs = ensemble_probs(models, arrays, np.arange(len(readable)), device, tta=tta,
                                            metadata=metadata[readable], class_model=class_model)
        for k, i in enumerate(readable):
            yield i, {"prepared": prepared[k], "prob": float(probs[k]),
                      "class_probs": None if class_probs is None else class_probs[k]}


def answers_agree(probs, class_probs, threshold):
    """For each image, whether its most likely class is malignant exactly where its decision (the
    probability at or above the threshold) is: a model's two answers agree."""
    top = np.asarray(DX_CODES)[np.argmax(np.atleast_2d(class_probs), axis=1)]
    return np.isin(top, list(MALIGNANT_DX)) == (np.atleast_1d(probs) >= threshold)


def prediction_row(name, result, threshold, operating_point, tta, calibration=None):
    """One image's row of predictions.csv (predict.py, and the web page's table) from a result of
    classify_files: the malignancy probability (a site's recalibrated one with calibration, the
    model's then in model_prob, to which the threshold applies), the decision, and where the model
    gives them the most likely of the 7 classes and each one's probability."""
    prepared, prob = result["prepared"], result["prob"]
    decision = "malignant" if prob >= threshold else "benign"
    # no plausible lesion (a blank image, a photo of something else): the model's score is no diagnosis
    row = {"file": name, "malignancy_prob": prob if calibration is None else float(recalibrated(prob, calibration)),
           "decision": decision if prepared["mask_ok"] else "no lesion found",
           "threshold": threshold, "operating_point": operating_point, "tta": int(tta),
           "mask_area": prepared["mask_area"], "mask_ok": prepared["mask_ok"]}
    if calibration is not None:
        row["model_prob"] = prob
    if result["class_probs"] is not None:
        top = int(np.argmax(result["class_probs"]))
        row.update(top_class=DX_CODES[top], top_class_prob=float(result["class_probs"][top]))
        # whether the most likely class is malignant exactly where the decision is (1), or the two
        # answers disagree (0: shown beside the answer); none where no lesion was found
        row["answers_agree"] = int(answers_agree(prob, result["class_probs"], threshold)[0]) \
            if prepared["mask_ok"] else None
        row.update({f"prob_{code}": float(result["class_probs"][k]) for k, code in enumerate(DX_CODES)})
    return row


def disagreement(row):
    """The words that say an image's two answers disagree, or None where they agree (or there is
    no class, or no lesion)."""
    if row.get("answers_agree") != 0:
        return None
    kind = "malignant" if row["top_class"] in MALIGNANT_DX else "benign"
    return f"the class is {kind} but the decision {row['decision']}"


def overlay_image(rgb, prepared, decision, prob, top_class=None):
    """The image with the lesion outline (red: malignant, green: benign, yellow: no lesion found),
    the decision and, where the model gives it, the most likely of the 7 classes."""
    rgb = rgb.copy()
    mask = cv2.resize(prepared["mask"], rgb.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    colour = {"malignant": (220, 40, 40), "benign": (40, 180, 40)}.get(decision, (230, 200, 40))
    thickness = max(2, rgb.shape[1] // 200)
    cv2.drawContours(rgb, contours, -1, colour, thickness)
    text = f"{decision} (p={prob:.2f})" + (f", {top_class}" if top_class else "")
    scale = rgb.shape[1] / 800
    cv2.putText(rgb, text, (10, int(40 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                thickness + 2)
    cv2.putText(rgb, text, (10, int(40 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness)
    return rgb


def pick_device(name="auto"):
    import torch
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


NOT_A_MODEL_FOLDER = "is no model folder (one holding model.pt and thresholds.json)"


class OperatingPoints:
    """A model folder's operating points (thresholds.json), or a site calibration's: thresholds by
    name, whether they were chosen on test-time-augmented probabilities (tta), the site's
    recalibration (None for the folder's own points), and the folder they come from."""

    def __init__(self, folder, clinic=None):
        self.thresholds, self.tta, self.calibration, self.folder = operating_points(folder, clinic)

    def threshold(self, name=None):
        """(name, threshold) of the named point, default_operating_point's without a name; a name the
        file does not hold ends with one line naming the points it does."""
        name = name or default_operating_point(self.thresholds)
        if name not in self.thresholds:
            fail(self.folder / "thresholds.json", f"has no operating point '{name}' "
                 f"(it has {', '.join(self.thresholds) or 'none'})")
        return name, self.thresholds[name]


def patient_metadata(age=None, sex=None, site=None, n=1):
    """metadata_features of n images of one patient (predict.py's --age, --sex, --site; the page's
    fields): None or '' is unknown, as it is for a model that reads no metadata."""
    known = pd.DataFrame({"age": [None if age in (None, "") else age], "sex": [sex or None],
                          "localization": [site or None]})
    return np.repeat(metadata_features(known), n, axis=0)


class ModelFolder:
    """A model folder: what train.py writes, export_model.py copies, ensemble.py combines, and the
    reference model is. Its networks are loaded once, on ONNX Runtime where the folder has current
    ONNX files, else on PyTorch (engine "onnx" or "torch" chooses); then classify() and predict()
    take images as many times as asked, through the preparation the networks were trained with
    (hair removal, the segmenter, the input form and size). Its operating points (thresholds.json,
    or with clinic a site calibration of calibrate.py) are read at their first use, the networks at
    load() or theirs: a script asks for the points first, so that a malformed file ends the run
    before torch's import and the networks' load. A folder without thresholds.json (a run that
    threshold.py has not read yet) still scores images and caches.

        model = ModelFolder("models/reference")
        table, problems = model.predict(["lesion.jpg"], age=60, site="back")
    """

    def __init__(self, path=REFERENCE_MODEL, clinic=None, engine=None, device="auto"):
        self.path = Path(path)
        if not self.path.is_dir():
            fail(self.path, NOT_A_MODEL_FOLDER)
        self.clinic, self.engine_asked, self.device_asked = clinic, engine, device
        self.models = self.class_model = self.settings = self.device = None

    @functools.cached_property
    def points(self):
        """The operating points: thresholds.json's, or the clinic's calibration's (OperatingPoints)."""
        return OperatingPoints(self.path, self.clinic)

    @functools.cached_property
    def class_biases(self):
        """The folder's class-logit biases chosen on validation (thresholds.json's class_biases, the
        folder's own whatever the clinic), applied to every class answer; None: none."""
        return read_class_biases(self.path) if (self.path / "thresholds.json").is_file() else None

    def load(self):
        """The networks (load_folder_models, load_class_model) and their preparation (folder_preprocessing),
        once. Returns the folder."""
        if self.models is None:
            models = load_folder_models(self.path, self.device_asked, self.engine_asked)
            if not models[0][1].get("onnx_networks"):  # a torch device: where PyTorch runs the networks
                self.device = pick_device(self.device_asked) if isinstance(self.device_asked, str) \
                    else self.device_asked
            self.class_model = load_class_model(self.path, self.device, models)
            self.settings = folder_preprocessing(models, self.path)
            self.models = models
        return self

    @property
    def checkpoint(self):
        """The (first) malignancy network's checkpoint: its arch, input, size, task, metadata, training args."""
        return self.load().models[0][1]

    @property
    def engine(self):
        return "onnx" if self.checkpoint.get("onnx_networks") else "torch"

    @property
    def has_classes(self):
        """Whether the folder gives the 7 class probabilities (classes.pt, or a 7-class or joint network)."""
        return self.load().class_model is not None or self.checkpoint["task"] in ("multiclass", SHARED_TASK)

    @property
    def reads_metadata(self):
        return any(checkpoint.get("metadata") for _, checkpoint in self.load().models)

    @property
    def general_sites(self):
        """train.py --general-sites: the folder reads the ISIC Archive's general site words as it trained."""
        return self.checkpoint.get("general_sites", False)

    def require_classes(self):
        if not self.has_classes:
            fail(self.path, NO_CLASSES)

    def classify(self, files, metadata=None, tta=None):
        """classify_files through the folder's networks: yields (index of the file, result) in order,
        result a dict (prepared, prob, class_probs) or, for a file that cannot be read or holds no
        lesion to diagnose, the ToolkitError that says so. metadata: a row of metadata_features per
        file (None: unknown); tta: as the operating points were chosen where None."""
        self.load()
        metadata = patient_metadata(n=len(files)) if metadata is None else metadata
        tta = self.points.tta if tta is None else tta
        for i, result in classify_files(self.models, self.settings, files, metadata, self.device, tta,
                                        self.class_model):
            if self.class_biases is not None and not isinstance(result, ToolkitError) \
                    and result["class_probs"] is not None:
                result["class_probs"] = with_class_biases(result["class_probs"][None, :], self.class_biases)[0]
            yield i, result

    def probs(self, arrays, rows, metadata=None, tta=False):
        """(malignancy probabilities, class probabilities or None) of a preprocess cache's rows
        (ensemble_probs; the class probabilities moved by the folder's class_biases)."""
        self.load()
        probs, class_probs = ensemble_probs(self.models, arrays, rows, self.device, tta=tta, metadata=metadata,
                                            class_model=self.class_model)
        if class_probs is not None and self.class_biases is not None:
            class_probs = with_class_biases(class_probs, self.class_biases)
        return probs, class_probs

    def predict(self, files, age=None, sex=None, site=None, operating_point=None, tta=None):
        """(a table of predict.py's CSV rows, one per image read; the ToolkitErrors of the files that
        could not be), at the named operating point (the default one where None)."""
        name, threshold = self.points.threshold(operating_point)
        tta = self.points.tta if tta is None else tta
        rows, problems = [], []
        for i, result in self.classify(files, patient_metadata(age, sex, site, len(files)), tta):
            if isinstance(result, ToolkitError):
                problems.append(result)
            else:
                rows.append(prediction_row(shown(files[i]), result, threshold, name, tta, self.points.calibration))
        return pd.DataFrame(rows), problems

    def explained_network(self):
        """(model, checkpoint) of the first network on PyTorch, what Grad-CAM follows a gradient through:
        the very one that classifies, or where ONNX Runtime does, PyTorch's network of the same weights."""
        if self.engine == "torch":
            return self.models[0]
        device = self.device if self.device is not None else pick_device(self.device_asked)
        return load_folder_models(self.path, device, "torch")[0]


# ---------------------------------------------------------------------------------------------
# the preprocess cache: its arrays, and the input forms a network reads


CACHE_ARRAYS = {"full": "images.npy", "crop": "crops.npy", "mask": "masks.npy"}
INPUTS = ("full", "masked", "crop", "both")


def load_cache(cache_dir):
    """Return (index DataFrame, arrays dict) of a cache written by preprocess.py. Arrays are
    memory-mapped: nothing is decoded, and only the rows used are read."""
    cache_dir = Path(cache_dir)
    index = read_csv(cache_dir / "index.csv", ("image_id", "malignant", "split", "row"))
    arrays = {}
    for name, filename in CACHE_ARRAYS.items():
        path = cache_dir / filename
        if not path.is_file():
            fail(path, "missing from the cache; run preprocess.py")
        try:
            arrays[name] = np.load(path, mmap_mode="r")
        except ValueError as e:
            fail(path, f"not a readable array ({e})")
        if len(arrays[name]) <= index["row"].max():
            fail(path, f"has {len(arrays[name])} rows but index.csv points at row {index['row'].max()}")
    return index, arrays


def model_inputs(arrays, rows, input_mode, size=None):
    """uint8 images (N, S, S, 3) of the given cache rows, in the chosen input form, resized to
    `size` where that differs from the cache's; (N, S, S, 6) for both views (crop, then whole)."""
    rows = np.asarray(rows)
    if input_mode == "full":
        images = np.ascontiguousarray(arrays["full"][rows])
    elif input_mode == "crop":
        images = np.ascontiguousarray(arrays["crop"][rows])
    elif input_mode == "masked":
        images = apply_mask(arrays["full"][rows], arrays["mask"][rows])
    elif input_mode == "both":  # the crop's 3 channels, then the whole image's: one network sees both
        return np.concatenate([model_inputs(arrays, rows, "crop", size), model_inputs(arrays, rows, "full", size)],
                              axis=-1)
    else:
        raise ValueError(f"unknown input mode {input_mode!r}")
    if size is not None and size != images.shape[1]:
        images = np.stack([resize_to(image, size) for image in images]) if len(images) else \
            np.zeros((0, size, size, 3), np.uint8)
    return images


# ---------------------------------------------------------------------------------------------
# running a network: probabilities (PyTorch or ONNX Runtime), Grad-CAM


def to_model_tensor(images_uint8, normalisation):
    """uint8 NHWC numpy or tensor -> normalised float NCHW tensor. The arithmetic runs in NHWC and
    the result is a permuted view: channels-last in memory, what the convolutions of these
    backbones run fastest on (CPU and GPU), at no copy."""
    import torch
    x = torch.as_tensor(images_uint8).float()
    views = x.shape[-1] // 3  # two views (--input both) are normalised alike
    mean = torch.tensor(normalisation["mean"]).repeat(views) * 255
    std = torch.tensor(normalisation["std"]).repeat(views) * 255
    return ((x - mean) / std).permute(0, 3, 1, 2)


# binary: one malignancy logit; multiclass: the 7 classes' logits (malignancy their malignant sum);
# joint: one network for both answers, a malignancy logit and then the 7 classes' (train.py --task
# joint; the fourth edition's design (a)), as SharedHeads also reads a frozen network
SHARED_TASK = "joint"
TASKS = ("binary", "multiclass", SHARED_TASK)
MALIGNANT_COLUMNS = [DX_CODES.index(code) for code in sorted(MALIGNANT_DX)]


def output_probs(logits, task):
    """(malignancy probability, class probabilities or None) from a batch of logits.
    Binary: one logit (sigmoid) or two (softmax). Multiclass: the 7 HAM10000 classes in DX_CODES
    order, and the malignancy score is the summed probability of mel, bcc and akiec, so the
    binary thresholds and metrics apply to it as well. SHARED_TASK: one binary logit for
    malignancy, then 7 for the classes."""
    import torch
    logits = logits.float()
    if task == SHARED_TASK:
        return torch.sigmoid(logits[:, 0]), torch.softmax(logits[:, 1:], dim=1)
    if task == "multiclass":
        classes = torch.softmax(logits, dim=1)
        return classes[:, MALIGNANT_COLUMNS].sum(dim=1), classes
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0]), None
    return torch.softmax(logits, dim=1)[:, 1], None


def inference_batch_size(images_uint8, device):
    """64 on a GPU; on a CPU as many images as make 8 of 160 px (predict_probs says why)."""
    if device.type != "cpu":
        return 64
    pixels = int(np.prod(images_uint8.shape[1:3])) if len(images_uint8) else 1
    return max(8, 8 * 160 * 160 // pixels)


def predict_probs(model, images_uint8, normalisation, device, task="binary", batch_size=None, tta=False,
                  metadata=None):
    """(malignancy probability per image, class probabilities (N, 7) or None), in order. With tta,
    the average over the 8 flips and right-angle rotations (dermoscopy has no up or down). metadata:
    metadata_features of the images, for a model trained with them. batch_size: by default 64 on a
    GPU and on a CPU as many images as make 8 of 160 px, where larger batches run slower
    (EfficientNet-Lite0 at 160 px on 2 cores: 50 ms an image at 8, 62 at 16, 90 at 32; they outgrow
    the processor's cache) and smaller images in batches of 8 spend their time in Python."""
    if isinstance(model, OnnxNetwork):
        return onnx_probs(model, images_uint8, task, tta, metadata, batch_size or 8)
    import torch
    model.eval()
    device = device or next(model.parameters()).device
    batch_size = batch_size or inference_batch_size(images_uint8, device)
    extra = {}
    views = [(k, flip) for k in range(4) for flip in (False, True)] if tta else [(0, False)]
    malignant, classes = [], []
    with torch.inference_mode():
        for start in range(0, len(images_uint8), batch_size):
            x = to_model_tensor(images_uint8[start:start + batch_size], normalisation).to(device)
            if metadata is not None:
                extra["metadata"] = torch.as_tensor(metadata[start:start + batch_size]).to(device)
            prob, class_probs = 0, 0
            for k, flip in views:
                view = torch.rot90(x, k, dims=(2, 3))
                view = torch.flip(view, dims=(3,)) if flip else view
                p, c = output_probs(model(view.contiguous(memory_format=torch.channels_last), **extra), task)
                prob = prob + p / len(views)
                class_probs = None if c is None else class_probs + c / len(views)
            malignant.append(prob.cpu())
            if class_probs is not None:
                classes.append(class_probs.cpu())
    malignant = torch.cat(malignant).numpy() if malignant else np.zeros(0)
    return malignant, (torch.cat(classes).numpy() if classes else None)


def onnx_probs(network, images_uint8, task, tta, metadata, batch_size):
    """predict_probs through ONNX Runtime, without torch: the same views in the same order, made of
    the uint8 images (a quarter of the bytes PyTorch's float views move: making those took a sixth
    of the network's time), each view of a batch one call (batches of 8: Lite0 at 160 px ran 507
    images/s on 2 cores, 435 at 64), and output_probs' arithmetic in numpy."""
    views = [(k, flip) for k in range(4) for flip in (False, True)] if tta else [(0, False)]
    malignant, classes = [], []
    for start in range(0, len(images_uint8), batch_size):
        batch = images_uint8[start:start + batch_size]
        features = None if metadata is None else metadata[start:start + batch_size]
        prob, class_probs = 0, 0
        for k, flip in views:
            view = np.rot90(batch, k, axes=(1, 2))  # NHWC: torch.rot90 over NCHW's (2, 3)
            view = view[:, :, ::-1] if flip else view
            p, c = output_probs_numpy(network.logits(view, features), task)
            prob = prob + p / len(views)
            class_probs = None if c is None else class_probs + c / len(views)
        malignant.append(np.asarray(prob, np.float32))
        if class_probs is not None:
            classes.append(class_probs.astype(np.float32))
    return (np.concatenate(malignant) if malignant else np.zeros(0)), (np.concatenate(classes) if classes else None)


def output_probs_numpy(logits, task):
    """output_probs of a numpy batch of logits."""
    def sigmoid(x):
        return 1 / (1 + np.exp(-x))

    def softmax(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    logits = logits.astype(np.float32)
    if task == SHARED_TASK:
        return sigmoid(logits[:, 0]), softmax(logits[:, 1:])
    if task == "multiclass":
        classes = softmax(logits)
        return classes[:, MALIGNANT_COLUMNS].sum(axis=1), classes
    if logits.shape[1] == 1:
        return sigmoid(logits[:, 0]), None
    return softmax(logits)[:, 1], None


def gradcam_maps(model, images_uint8, normalisation, device, task, metadata=None, arch=None):
    """Grad-CAM of the malignancy score at the layer its architecture names (the last convolution
    where arch is None): the channels' activations weighted by their mean gradient, rectified,
    scaled to [0, 1] per image. metadata: metadata_features of the images, for a model trained with
    them (None: unknown)."""
    import torch
    from networks import gradcam_layer, last_convolution
    layer = last_convolution(model) if arch is None else gradcam_layer(model, arch)
    saved = {}
    hooks = [layer.register_forward_hook(lambda m, i, o: saved.__setitem__("activation", o)),
             layer.register_full_backward_hook(lambda m, gi, go: saved.__setitem__("gradient", go[0]))]
    model.eval()
    try:
        x = to_model_tensor(images_uint8, normalisation).to(device).requires_grad_(True)
        extra = {} if metadata is None else {"metadata": torch.as_tensor(metadata).to(device)}
        prob, _ = output_probs(model(x, **extra), task)
        model.zero_grad()
        torch.log(prob.clamp_min(1e-7)).sum().backward()
    finally:
        for hook in hooks:
            hook.remove()
    weights = saved["gradient"].mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * saved["activation"]).sum(dim=1)).detach()
    cam = cam / cam.flatten(1).max(dim=1).values.clamp_min(1e-7).view(-1, 1, 1)
    return cam.cpu().numpy()


def heat_overlay(image_uint8, cam):
    """A Grad-CAM map over the image it explains (jet colours, 45%)."""
    heat = cv2.resize(cam, image_uint8.shape[1::-1])
    coloured = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return (0.55 * image_uint8 + 0.45 * coloured).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# training


def cosine_with_warmup(optimizer, warmup_steps, total_steps):
    """Linear warm-up to the optimiser's learning rate, then cosine decay to zero, per step."""
    import torch

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_dtype(precision, device, arch=None):
    """The dtype for torch.autocast, or None for plain fp32. auto on a CPU with native bf16: bf16
    for ResNets, fp32 for EfficientNet-Lite, whose depthwise convolutions gain nothing from it
    (2 cores, channels-last, batch 32: Lite0 47.2 images/s in fp32 against 30.5 in bf16 at 128 px,
    32.5 against 25.2 at 160; ResNet18 39.0 against 82.9; bench/train_speed.py --variants)."""
    import torch
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if arch is not None and arch.startswith("efficientnet_lite"):
            return None
        if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
            return torch.bfloat16  # native bf16: measured 2x for resnet18 on such a CPU
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def optimisation_step(loss, optimizer, scaler, scheduler):
    """Back-propagate loss and step the optimiser (through the gradient scaler fp16 needs), then
    the learning-rate schedule."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def prepare_model(model, device):
    """Move a model to its device in the memory layout its inputs come in."""
    import torch
    model = model.to(device)
    if device.type in ("cpu", "cuda"):  # MPS lacks channels-last kernels for some layers
        model = model.to(memory_format=torch.channels_last)
    return model


# ---------------------------------------------------------------------------------------------
# metrics and plots


def threshold_metrics(y_true, prob, threshold):
    """Metrics of the decisions prob >= threshold."""
    y_true = np.asarray(y_true).astype(bool)
    pred = np.asarray(prob) >= threshold
    tp, fp = int(np.sum(pred & y_true)), int(np.sum(pred & ~y_true))
    fn, tn = int(np.sum(~pred & y_true)), int(np.sum(~pred & ~y_true))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "threshold": float(threshold),
        "accuracy": (tp + tn) / len(y_true),
        "precision": precision,
        "recall": recall,
        "specificity": tn / (tn + fp) if tn + fp else 0.0,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def ranking_metrics(y_true, prob):
    """ROC-AUC and PR-AUC (average precision): from the probabilities alone, so the same at
    every threshold. NaN where only one class is present. The same numbers as scikit-learn's
    roc_auc_score and average_precision_score (ties included; tests/test_common.py compares them),
    in a tenth of their time: a bootstrap calls this a thousand times per set scored."""
    from scipy.stats import rankdata
    y_true, prob = np.asarray(y_true).astype(bool), np.asarray(prob, dtype=float)
    positives = int(y_true.sum())
    if not 0 < positives < len(y_true):
        return {"roc_auc": float("nan"), "pr_auc": float("nan")}
    # Mann-Whitney: the chance a malignant image outranks a benign one, a tie counting half
    roc_auc = (rankdata(prob)[y_true].sum() - positives * (positives + 1) / 2) / (positives * (len(y_true) - positives))
    order = np.argsort(-prob, kind="mergesort")
    last_of_each_score = np.r_[np.flatnonzero(np.diff(prob[order])), len(prob) - 1]
    true_positives = np.cumsum(y_true[order])[last_of_each_score]
    precision, recall = true_positives / (last_of_each_score + 1), true_positives / positives
    return {"roc_auc": float(roc_auc), "pr_auc": float(np.sum(np.diff(recall, prepend=0) * precision))}


def group_members(groups):
    """The row indices of each group (a lesion, a patient), groups in sorted order: a bootstrap
    draws whole groups, since one lesion's several images are no independent cases."""
    _, group = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    return np.split(np.argsort(group, kind="stable"), np.cumsum(np.bincount(group))[:-1])


def group_resamples(members, n_resamples, seed):
    """Bootstrap resamples of whole groups (group_members): each the row indices of as many groups
    as there are, drawn with replacement."""
    rng = np.random.default_rng(seed)
    for _ in range(n_resamples):
        yield np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])


def paired_differences(figure, arms, n_seeds, members, n_resamples, seed):
    """The studies' paired comparison: each arm's figures beside the baseline's (the first arm), seed
    by seed on the same images. figure(arm, s, pick) gives the figures (a number, or several) of the
    arm's run of seed s on the rows `pick` (None: every row). Returns {arm: (its figures at each
    seed, their differences from the baseline's at each seed, the 95% percentile interval (low,
    high) of the seed-mean difference over bootstrap resamples of whole groups (members,
    group_resamples), every seed recomputed on each resample)}: arrays with one entry per figure;
    a draw that cannot give a figure (NaN) is left out of that figure's interval; the baseline's
    interval is NaN."""
    names = list(arms)

    def figures(name, s, pick):
        return np.atleast_1d(np.asarray(figure(name, s, pick), dtype=float))

    values = {(name, s): figures(name, s, None) for name in names for s in range(n_seeds)}
    samples = {name: [] for name in names[1:]}
    for pick in group_resamples(members, n_resamples, seed):
        drawn = {(name, s): figures(name, s, pick) for name in names for s in range(n_seeds)}
        for name in names[1:]:
            samples[name].append(np.mean([drawn[name, s] - drawn[names[0], s] for s in range(n_seeds)], axis=0))
    result = {}
    for name in names:
        seeds = np.array([values[name, s] for s in range(n_seeds)])
        differences = np.array([values[name, s] - values[names[0], s] for s in range(n_seeds)])
        low = high = np.full(seeds.shape[1], np.nan)
        if samples.get(name):
            drawn = np.array(samples[name])
            bounds = [np.percentile(column[np.isfinite(column)], [2.5, 97.5]) if np.isfinite(column).any()
                      else (np.nan, np.nan) for column in drawn.T]
            low, high = np.array([b[0] for b in bounds]), np.array([b[1] for b in bounds])
        result[name] = (seeds, differences, (low, high))
    return result


def multiclass_figures(truth, class_probs):
    """Per-class precision, recall and one-vs-rest ROC-AUC of the most probable class (NaN for a
    class absent from truth; precision NaN for a class never predicted), and the 7x7 counts.
    truth: indices into DX_CODES."""
    n = len(DX_CODES)
    counts = np.bincount(truth * n + class_probs.argmax(axis=1), minlength=n * n).reshape(n, n)
    hits = np.diag(counts).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(counts.sum(axis=1) > 0, hits / counts.sum(axis=1), np.nan)
        precision = np.where(counts.sum(axis=0) > 0, hits / counts.sum(axis=0), np.nan)
    roc_auc = np.array([ranking_metrics(truth == k, class_probs[:, k])["roc_auc"] for k in range(n)])
    return {"precision": precision, "recall": recall, "roc_auc": roc_auc, "counts": counts}


def best_f1_threshold(labels, probs):
    from sklearn.metrics import precision_recall_curve
    precision, recall, thresholds = precision_recall_curve(labels, probs)
    # The last precision/recall pair has no threshold (recall 0 by convention).
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    return float(thresholds[np.argmax(f1)])


def recall_target_threshold(labels, probs, target):
    """Highest threshold whose recall reaches the target: the fewest false alarms that still
    catch that share of malignant lesions."""
    from sklearn.metrics import precision_recall_curve
    _, recall, thresholds = precision_recall_curve(labels, probs)
    reaching = recall[:-1] >= target
    return float(thresholds[reaching].max())


def recall_bound_threshold(labels, probs, lesion_ids, target, n_resamples, seed):
    """Highest threshold whose recall's lower 95% bound reaches the target. The malignant lesions
    are resampled, not images: a lesion's images rise and fall together. Falls back to the lowest
    malignant score when no threshold's bound reaches the target (too few malignant lesions)."""
    positive = labels == 1
    candidates = np.unique(probs[positive])[::-1]  # every threshold that changes recall, highest first
    lesions, lesion_of_image = np.unique(lesion_ids[positive], return_inverse=True)
    # hits[l, t]: images of malignant lesion l scored >= candidate t; recall = W @ hits / W @ sizes
    hits = np.zeros((len(lesions), len(candidates)))
    np.add.at(hits, lesion_of_image, probs[positive][:, None] >= candidates[None, :])
    sizes = np.bincount(lesion_of_image, minlength=len(lesions))
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(lesions), np.full(len(lesions), 1 / len(lesions)), size=n_resamples)
    lower = np.percentile((weights @ hits) / (weights @ sizes)[:, None], 2.5, axis=0)
    reaching = np.flatnonzero(lower >= target)
    return float(candidates[reaching[0]] if len(reaching) else candidates[-1])


def specificity_target_threshold(labels, probs, target):
    """Lowest threshold whose specificity reaches the target. Where only calling nothing malignant
    reaches it (a benign image has the top score and the target is 1), just above the top score."""
    from sklearn.metrics import roc_curve
    fpr, _, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    keeping = (1 - fpr >= target) & np.isfinite(thresholds)
    return float(thresholds[keeping].min()) if keeping.any() else float(np.nextafter(probs.max(), np.inf))


def exact_interval(k, n):
    """The exact (Clopper-Pearson) 95% interval of a proportion k / n; NaNs where n is 0."""
    from scipy.stats import binomtest
    if not n:
        return float("nan"), float("nan")
    ci = binomtest(int(k), int(n)).proportion_ci(0.95, method="exact")
    return float(ci.low), float(ci.high)


def recall_lower_bound_exact(found, malignant):
    """The exact lower 95% bound of a recall of found / malignant: the percentile bootstrap's is
    degenerate with a few dozen malignant images (finding all of them gives a bound of 1.0); this
    one is 0.025 ** (1 / n) then, the most that n images can show."""
    return exact_interval(found, malignant)[0] if malignant else 0.0


def recall_bound_threshold_exact(labels, probs, target):
    """Highest threshold whose recall's exact lower 95% bound reaches the target; where none does
    (too few malignant images to show it), the lowest malignant score: every malignant image found."""
    positive = np.sort(probs[labels == 1])[::-1]  # threshold positive[k] finds the k + 1 highest
    bounds = np.array([recall_lower_bound_exact(k + 1, len(positive)) for k in range(len(positive))])
    # images of equal score are found together: a threshold finds all of them
    found = np.searchsorted(-positive, -positive, side="right")
    reaching = np.flatnonzero(bounds[found - 1] >= target)
    return float(positive[reaching[0]] if len(reaching) else positive[-1])


def balanced_accuracy_7(dx, class_probs):
    """Balanced accuracy (mean per-class recall) of the most probable of the 7 classes, over the
    classes present in dx (PH2 holds two of them)."""
    from sklearn.metrics import balanced_accuracy_score
    with warnings.catch_warnings():  # predicting a class absent from dx is an error it counts, not a fault
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
        return float(balanced_accuracy_score([DX_CODES.index(code) for code in dx], np.argmax(class_probs, axis=1)))


def top_class_balanced_accuracy(dx, class_probs, classes):
    """The mean recall over `classes` of the top class, the argmax over all seven (naming a class
    outside `classes` is a miss); a class without images here is left out of the mean."""
    top = np.asarray(DX_CODES)[np.argmax(class_probs, axis=1)]
    recalls = [np.mean(top[dx == code] == code) for code in classes if (dx == code).any()]
    return float(np.mean(recalls)) if recalls else np.nan


CLASS_BIAS_GRID = np.round(np.arange(-3.0, 3.0001, 0.1), 1)


def chosen_class_biases(dx, class_probs, sweeps=3):
    """Seven class-logit biases (DX_CODES order) that maximise the top class's balanced accuracy on
    validation images (docs/fourth_edition.md, JPB): a coordinate search, each bias over
    CLASS_BIAS_GRID in turn, `sweeps` times; ties keep the smaller bias. Malignancy is untouched."""
    dx, class_probs = np.asarray(dx), np.asarray(class_probs)
    classes = [code for code in DX_CODES if (dx == code).any()]
    biases = np.zeros(len(DX_CODES))

    def score(b):
        return top_class_balanced_accuracy(dx, class_probs * np.exp(b)[None, :], classes)

    best = score(biases)
    for _ in range(sweeps):
        for k in range(len(DX_CODES)):
            for value in sorted(CLASS_BIAS_GRID, key=abs):
                trial = biases.copy()
                trial[k] = value
                trial_score = score(trial)
                if trial_score > best + 1e-12:
                    best, biases = trial_score, trial
    return biases


def with_class_biases(class_probs, biases):
    """Class probabilities with the class logits moved by `biases`: each times exp(bias), renormalised."""
    probs = np.asarray(class_probs) * np.exp(np.asarray(biases, dtype=np.float64))[None, :]
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.asarray(class_probs).dtype)


def class_table_lines(table):
    """evaluate.py's multiclass_metrics.csv as a Markdown table, intervals in brackets (evaluate.py's
    report and bench/study2.py's test tables)."""
    lines = ["| class | images | predicted | recall | precision | ROC-AUC (one vs rest) |", "|---|---|---|---|---|---|"]
    for row in table.to_dict("records"):
        cells = [("n/a" if np.isnan(row[m]) else f"{row[m]:.3f}") + (
            f" [{row[m + '_lo']:.3f}, {row[m + '_hi']:.3f}]" if not np.isnan(row.get(m + "_lo", np.nan)) else "")
            for m in ("recall", "precision", "roc_auc")]
        lines.append(f"| {row['class']} | {row['support']} | {row['predicted']} | " + " | ".join(cells) + " |")
    return lines


def binary_metrics(y_true, prob, threshold):
    """Every metric at one operating point."""
    return {**threshold_metrics(y_true, prob, threshold), **ranking_metrics(y_true, prob)}


def new_figure(ncols=1, figsize=(5, 4.5), nrows=1):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt.subplots(nrows, ncols, figsize=figsize, squeeze=False) if nrows > 1 else \
        plt.subplots(1, ncols, figsize=figsize)


def save_figure(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def save_image_grid(tiles, titles, path, columns, tile_inches=(3.2, 2.7)):
    """RGB tiles in rows of `columns`, each with its title; a None tile leaves its place empty."""
    rows = max(1, -(-len(tiles) // columns))
    fig, axes = new_figure(ncols=columns, nrows=rows, figsize=(tile_inches[0] * columns, tile_inches[1] * rows))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, tile, title in zip(np.ravel(axes), tiles, titles):
        if tile is not None:
            ax.imshow(tile)
            ax.set_title(title, fontsize=7)
    save_figure(fig, path)


def plot_reliability(labels, probs, path, calibrated=None, bins=10):
    """Reliability diagram of the model's probability, and of a site's recalibrated one beside it, with
    each one's Brier score and expected calibration error."""
    from sklearn.calibration import calibration_curve
    fig, ax = new_figure()
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfectly calibrated")
    for p, name in ((probs, "model"), (calibrated, "recalibrated to the clinic")):
        if p is not None:
            observed, predicted = calibration_curve(labels, p, n_bins=bins, strategy="quantile")
            brier, ece = calibration_errors(labels, p)
            ax.plot(predicted, observed, "o-", label=f"{name} (Brier {brier:.3f}, ECE {ece:.3f})")
    ax.set(xlabel="predicted malignancy probability", ylabel="observed share malignant", xlim=(0, 1),
           ylim=(0, 1), title=f"reliability diagram ({bins} equal-count bins)")
    ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, path)


def plot_pr_curve(y_true, prob, operating_points, path, title):
    """Precision-recall curve with each named threshold marked where it lands."""
    from sklearn.metrics import average_precision_score, precision_recall_curve
    precision, recall, _ = precision_recall_curve(y_true, prob)
    fig, ax = new_figure()
    ax.plot(recall, precision, label=f"AP = {average_precision_score(y_true, prob):.3f}")
    for name, threshold in operating_points.items():
        m = binary_metrics(y_true, prob, threshold)
        ax.plot(m["recall"], m["precision"], "o", label=f"{name} (t={threshold:.3f})")
    ax.axhline(np.mean(y_true), color="grey", ls=":", label="prevalence")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", xlim=(0, 1.01), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower left", fontsize=8)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# site calibration: a clinic's own labelled images set its operating points and probability
# (calibrate.py writes <run>/clinics/<name>/, predict.py and evaluate.py --clinic read it)

# the percentile bootstrap over lesions bounds recall from this many malignant lesions on; below,
# the exact binomial bound over malignant images (the bootstrap's is degenerate with a few dozen)
BOOTSTRAP_MIN_MALIGNANT = 100
# isotonic recalibration from this many images of each class on; below, logistic on the logit
ISOTONIC_MIN_PER_CLASS = 100


def clinic_dir(model_folder, name, must_exist=True):
    """<run>/clinics/<name>, the name checked to be a plain folder name (it becomes a path)."""
    if not SAFE_NAME.fullmatch(str(name)) or len(str(name)) > 64:
        fail(name, "is not a clinic name: up to 64 letters, digits, '_', '.' and '-', starting with a letter or digit")
    folder = Path(model_folder) / "clinics" / name
    if must_exist and not (folder / "thresholds.json").is_file():
        known = sorted(p.parent.name for p in (Path(model_folder) / "clinics").glob("*/thresholds.json"))
        fail(folder, f"no calibration of that name; run calibrate.py (calibrated: {', '.join(known) or 'none'})")
    return folder


def operating_points(model_folder, clinic=None):
    """(thresholds, whether they were chosen on test-time-augmented probabilities, the site's
    recalibration or None, the folder they come from): the run's own, or with `clinic` the site
    calibration calibrate.py wrote. Thresholds apply to the model's probability either way."""
    folder = clinic_dir(model_folder, clinic) if clinic else Path(model_folder)
    return read_thresholds(folder), chosen_with_tta(folder), read_calibration(folder) if clinic else None, folder


def images_needed_for_bound(target):
    """The fewest malignant images whose exact lower 95% bound can reach the target at all (all found)."""
    return math.ceil(math.log(0.025) / math.log(target)) if target < 1 else math.inf


def site_operating_points(labels, probs, lesion_ids, target_recall, target_specificity=None, n_resamples=2000,
                          seed=0):
    """The operating points of threshold.py, chosen on a site's images: (thresholds, how recall_bound
    was bounded, warnings). With fewer than BOOTSTRAP_MIN_MALIGNANT malignant lesions recall_bound's
    bound is the exact binomial one; where the sample cannot certify the target, recall_bound is the
    lowest malignant score (every malignant image found) and a warning says so."""
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=float)
    lesion_ids = np.asarray(lesion_ids).astype(str)
    malignant = int(labels.sum())
    malignant_lesions = len(np.unique(lesion_ids[labels == 1]))
    if malignant_lesions >= BOOTSTRAP_MIN_MALIGNANT:
        method = f"percentile bootstrap over {malignant_lesions} malignant lesions"
        bound = recall_bound_threshold(labels, probs, lesion_ids, target_recall, n_resamples, seed)
    else:
        method = f"exact binomial (Clopper-Pearson) over {malignant} malignant images"
        bound = recall_bound_threshold_exact(labels, probs, target_recall)
    thresholds = {"default": 0.5, "best_f1": best_f1_threshold(labels, probs),
                  "recall_target": recall_target_threshold(labels, probs, target_recall), "recall_bound": bound}
    if target_specificity is not None:
        thresholds["specificity_target"] = specificity_target_threshold(labels, probs, target_specificity)
    warnings = []
    reachable = recall_lower_bound_exact(malignant, malignant)
    if malignant_lesions < BOOTSTRAP_MIN_MALIGNANT and reachable < target_recall:
        warnings.append(f"with {malignant} malignant images the highest recall a 95% bound can certify is "
                        f"{reachable:.3f} (all of them found), below the target {target_recall}: recall_bound is "
                        f"the lowest malignant score, and its recall on new images is not certified; "
                        f"{images_needed_for_bound(target_recall)} malignant images could certify {target_recall}")
    if malignant < 10 or len(labels) - malignant < 10:
        warnings.append(f"{malignant} malignant and {len(labels) - malignant} benign images: too few to choose "
                        "any operating point with confidence")
    return thresholds, method, warnings


def fit_recalibration(labels, probs):
    """A monotone map from the model's probability to the site's frequency of malignancy: isotonic
    regression with ISOTONIC_MIN_PER_CLASS images of each class or more, logistic regression on
    the logit below (two parameters: what a small sample supports). Returns a JSON-able dict that
    recalibrated() applies."""
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=float)
    if min(labels.sum(), len(labels) - labels.sum()) >= ISOTONIC_MIN_PER_CLASS:
        from sklearn.isotonic import IsotonicRegression
        iso = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(probs, labels)
        return {"method": "isotonic", "x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}
    from sklearn.linear_model import LogisticRegression
    fit = LogisticRegression(C=1e4).fit(logit(probs)[:, None], labels)  # nearly unpenalised: Platt scaling
    return {"method": "logistic on the logit", "slope": float(fit.coef_[0, 0]), "intercept": float(fit.intercept_[0])}


def logit(probs):
    probs = np.clip(np.asarray(probs, dtype=float), 1e-6, 1 - 1e-6)
    return np.log(probs / (1 - probs))


def recalibrated(probs, calibration):
    """The site's probability of malignancy for the model's probabilities (fit_recalibration's map)."""
    probs = np.asarray(probs, dtype=float)
    if calibration["method"] == "isotonic":
        return np.interp(probs, calibration["x"], calibration["y"])
    return 1 / (1 + np.exp(-(calibration["slope"] * logit(probs) + calibration["intercept"])))


def read_calibration(folder):
    """calibration.json of a clinic folder, checked: a map recalibrated() can apply, or one line."""
    path = Path(folder) / "calibration.json"
    calibration = read_json(path)
    ok = isinstance(calibration, dict) and (
        (calibration.get("method") == "isotonic" and isinstance(calibration.get("x"), list)
         and isinstance(calibration.get("y"), list) and 0 < len(calibration["x"]) == len(calibration["y"]))
        or (calibration.get("method") == "logistic on the logit"
            and all(isinstance(calibration.get(k), (int, float)) for k in ("slope", "intercept"))))
    if not ok:
        fail(path, "is not a recalibration calibrate.py writes (isotonic x/y, or logistic slope/intercept)")
    return calibration


def calibration_errors(labels, probs, bins=10):
    """(Brier score, expected calibration error over `bins` equal-width bins of probability)."""
    labels, probs = np.asarray(labels, dtype=float), np.asarray(probs, dtype=float)
    which = np.minimum((probs * bins).astype(int), bins - 1)
    ece = sum(abs(labels[which == b].mean() - probs[which == b].mean()) * np.mean(which == b)
              for b in range(bins) if np.any(which == b))
    return float(np.mean((probs - labels) ** 2)), float(ece)
