"""predict.py's path on each inference engine, stage by stage (issue 44): a model folder read through
ONNX Runtime (its ONNX files) and through PyTorch, side by side in one run on the same images.

Stages: timed inside one process by wrapping the functions classify_files calls (the very path
predict.py and the page run, in batches of 8): decode (the file read and decoded, scaled to the
working size), hair removal, segmentation (the U-Net and its mask's post-processing; the U-Net's
network time also alone), colour constancy, the crop and resizes, and each network (model.pt,
classes.pt, with test-time augmentation where asked). Each engine is timed twice, alternating,
after one warm-up batch; a stage's figure is the smaller of the two (ms per image).
End to end: predict.py through its command line (its own images/s figure and the wall time of a
whole call), for each engine on the same files, and one image with start-up (median of 3).
Images: the first N HAM10000 images in labels.csv's order (200x150; no diagnosis is read) and
PH2's 100 (765x573). Writes <out>.json and <out>.md.

Example: python bench/engine_speed.py --model models/reference --n 500 --out bench/results/engine_speed
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import common  # noqa: E402
from common import REFERENCE_MODEL, atomic_path, one_line_errors, write_json  # noqa: E402
from reference_model import predict_run  # noqa: E402  (predict.py's own images/s, the call's wall seconds)

SHARED = ROOT.parent / "shared" / "data"
ENGINES = ("onnx", "torch")
# (stage, the common function whose time it is): classify_files reaches each through common's globals
WRAPPED = (("decode", "read_rgb"), ("scale to working size", "working_image"), ("hair removal", "remove_hair"),
           ("segmentation (all)", "learned_lesion_masks"), ("segmentation: U-Net network", "segmenter_logits"),
           ("colour constancy", "shades_of_gray"), ("crop and resize", "resize_to"),
           ("classifier networks (all)", "ensemble_probs"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REFERENCE_MODEL, help="a model folder with ONNX files")
    p.add_argument("--n", type=int, default=500, help="HAM10000 images")
    p.add_argument("--no-tta", dest="tta", action="store_false", help="without test-time augmentation")
    p.add_argument("--out", type=Path, required=True, help="output prefix (.json and .md are added)")
    return p.parse_args(argv)


class StageTimer:
    """Wraps common's functions so that each call's seconds add to its stage, and each network's
    predict_probs call to that network's name."""

    def __init__(self):
        self.seconds = {}
        self.originals = {}

    def wrap(self, stage, name):
        original = self.originals.setdefault(name, getattr(common, name))

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started
        setattr(common, name, timed)

    def wrap_networks(self, names):
        """predict_probs' time by the network it ran (names: {id(network): file name})."""
        original = self.originals.setdefault("predict_probs", common.predict_probs)

        def timed(model, *args, **kwargs):
            started = time.perf_counter()
            try:
                return original(model, *args, **kwargs)
            finally:
                stage = f"network: {names.get(id(model), 'other')}"
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started
        common.predict_probs = timed

    def restore(self):
        for name, original in self.originals.items():
            setattr(common, name, original)


def stage_times(model_dir, engine, files, tta):
    """{stage: ms per image} of classify_files on the files, and the whole loop's images/s."""
    model = common.ModelFolder(model_dir, engine=engine, device="cpu").load()
    names = {id(model.models[0][0]): "model.pt"}
    if model.class_model is not None:
        names[id(model.class_model[0])] = "classes.pt"
    list(model.classify(files[:8], tta=tta))  # warm-up
    timer = StageTimer()
    for stage, name in WRAPPED:
        timer.wrap(stage, name)
    timer.wrap_networks(names)
    try:
        started = time.perf_counter()
        results = list(model.classify(files, tta=tta))
        total = time.perf_counter() - started
    finally:
        timer.restore()
    skipped = sum(isinstance(r, common.ToolkitError) for _, r in results)
    if skipped:
        raise SystemExit(f"{skipped} images could not be read")
    times = {stage: 1000 * s / len(files) for stage, s in timer.seconds.items()}
    times["all (classify_files)"] = 1000 * total / len(files)
    return times, len(files) / total


@one_line_errors
def main(args):
    labels = pd.read_csv(SHARED / "ham10000_full" / "labels.csv")
    ham = [SHARED / "ham10000_full" / f for f in labels["filename"].head(args.n)]
    ph2 = [SHARED / "ph2" / f for f in pd.read_csv(SHARED / "ph2" / "labels.csv")["filename"]]
    tta_flag = "--tta" if args.tta else "--no-tta"
    results = {"model": str(args.model), "tta": args.tta, "sets": {}}
    sets = ((f"HAM10000, {len(ham)} images (200x150)", ham), (f"PH2, {len(ph2)} images (765x573)", ph2))
    for set_name, files in sets:
        stages = {engine: [] for engine in ENGINES}
        for _ in range(2):  # alternating, so that a slower spell of the machine hits both engines
            for engine in ENGINES:
                stages[engine].append(stage_times(args.model, engine, files, args.tta))
                print(set_name, engine, f"{stages[engine][-1][1]:.1f} images/s in-process")
        calls = {engine: [] for engine in ENGINES}
        for _ in range(2):
            for engine in ENGINES:
                calls[engine].append(predict_run(files, "--run", args.model, "--engine", engine, tta_flag))
                print(set_name, engine, "predict.py", calls[engine][-1])
        results["sets"][set_name] = {
            engine: {"stages_ms_per_image": {stage: min(run[0][stage] for run in stages[engine])
                                             for stage in stages[engine][0][0]},
                     "predict_images_per_s": max(rate for rate, _ in calls[engine]),
                     "predict_wall_s": min(wall for _, wall in calls[engine])}
            for engine in ENGINES}
    results["one_image_wall_s"] = {engine: statistics.median(predict_run(ham[:1], "--run", args.model, "--engine",
                                                                          engine, tta_flag)[1] for _ in range(3))
                                   for engine in ENGINES}
    write_json(results, args.out.with_suffix(".json"))
    lines = [f"predict.py's path on {args.model}, {'with' if args.tta else 'without'} test-time augmentation, "
             "each engine in the same run (ms per image; the smaller of two runs)", ""]
    for set_name, by_engine in results["sets"].items():
        stages = list(by_engine["torch"]["stages_ms_per_image"])
        lines += [f"### {set_name}", "", "| stage | ONNX Runtime | PyTorch | PyTorch / ONNX |", "|---|---|---|---|"]
        for stage in stages:
            onnx, torch_ms = (by_engine[e]["stages_ms_per_image"].get(stage, 0.0) for e in ENGINES)
            lines.append(f"| {stage} | {onnx:.1f} | {torch_ms:.1f} | {torch_ms / onnx:.2f}x |" if onnx else
                         f"| {stage} | {onnx:.1f} | {torch_ms:.1f} | |")
        rates = [by_engine[e]["predict_images_per_s"] for e in ENGINES]
        lines += [f"| **predict.py, images/s** | **{rates[0]:.1f}** | **{rates[1]:.1f}** | "
                  f"{rates[0] / rates[1]:.2f}x faster |", ""]
    one = results["one_image_wall_s"]
    lines.append(f"One image, start-up included (median of 3 calls): ONNX Runtime {one['onnx']:.2f} s, PyTorch "
                 f"{one['torch']:.2f} s.")
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(parse_args())
