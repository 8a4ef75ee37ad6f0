"""A local web page for a model: drop in photos of skin lesions and see, for each, the lesion's
outline, the malignancy probability, the decision at an operating point, the seven class
probabilities where the model gives them, and a Grad-CAM map of what the network looked at.

Serves http://127.0.0.1:7860 (--host and --port to change it) with the reference model, or --run
for any model folder, and --clinic for a site calibration of it (calibrate.py); both can be
changed on the page where the folder has calibrations. Images go through what predict.py uses
(common.ModelFolder, loaded once, and common.prediction_row), so the page and predict.py give
the same probabilities, and its table downloads as predict.py's CSV. Nothing leaves the machine:
no analytics, no fonts or scripts from the internet; uploads live in a temporary folder that is
removed when the server stops. Needs the optional requirements: pip install -r requirements-app.txt
(make app installs them). For research and teaching, not a diagnosis.

Examples: python app.py
          python app.py --run runs/lite0 --clinic ph2 --port 7861
"""
import atexit
import base64
import html
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from common import (DX_CODES, ENGINES, REFERENCE_MODEL, SEXES, SITES, ArgumentParser, ModelFolder, OperatingPoints,
                    ToolkitError, disagreement, fail, gradcam_maps, heat_overlay, model_inputs, number_in,
                    one_line_errors, overlay_image, patient_metadata, prediction_row, read_rgb, shown, write_csv)

DX_NAMES = {"mel": "melanoma", "nv": "melanocytic nevus", "bcc": "basal cell carcinoma",
            "akiec": "actinic keratosis / intraepithelial carcinoma", "bkl": "benign keratosis",
            "df": "dermatofibroma", "vasc": "vascular lesion"}
NO_CLINIC = "none (the model's own)"
SHOWN_SIDE = 320  # pixels of the longer side of each picture on the page


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--run", type=Path, default=REFERENCE_MODEL,
                   help="model folder (default: the reference model, models/reference)")
    p.add_argument("--clinic", metavar="NAME", help="a site calibration of the run to start with (calibrate.py)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=number_in(int, 1, 65535), default=7860)
    p.add_argument("--max-files", type=number_in(int, 1), default=20, help="images one request may hold")
    p.add_argument("--max-mb", type=number_in(float, 0, low_open=True), default=20, help="largest file, in MB")
    p.add_argument("--engine", choices=ENGINES,
                   help="onnx: ONNX Runtime (a model folder's ONNX files); torch: PyTorch (default: onnx where the "
                        "folder has them; the Grad-CAM map is PyTorch's either way)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    return p.parse_args(argv)


class Page:
    """The model, loaded once, and what one request of the page does with it."""

    def __init__(self, args, scratch, model=None):
        model = model or ModelFolder(args.run, args.clinic, args.engine, args.device)
        self.model, self.scratch, self.max_files, self.max_bytes = model, scratch, args.max_files, args.max_mb * 1e6
        self.start_point = model.points.threshold()[0]
        self.points = list(OperatingPoints(model.path).thresholds)
        model.load()
        # Grad-CAM follows a gradient: PyTorch's network of the same weights, where ONNX Runtime classifies
        self.explained = model.explained_network()
        clinics = sorted(p.parent.name for p in (model.path / "clinics").glob("*/thresholds.json"))
        self.clinics = [NO_CLINIC, *clinics]
        self.start_clinic = args.clinic or NO_CLINIC

    def describe(self):
        model, c = self.model, self.model.checkpoint
        name = "the reference model (models/reference)" if model.path.resolve() == REFERENCE_MODEL else shown(model.path)
        text = f"{name}: {c['arch']}, {c['input']} input at {c['input_size']} px"
        if len(model.models) > 1:
            text = f"{name}: the mean of {len(model.models)} models"
        return text + ("; the 7 classes from its classes.pt" if model.class_model is not None else "") + \
            ("; run by ONNX Runtime" if model.engine == "onnx" else "")

    def classify(self, files, age, sex, site, operating_point, clinic):
        """(result HTML, messages Markdown, table, CSV path or None, the line under the result)."""
        files = [Path(f) for f in (files or [])]
        if not files:
            return "", "Drop or pick one or more images first.", None, None, ""
        if len(files) > self.max_files:
            return "", (f"{len(files)} files at once: the page takes at most {self.max_files}. "
                        "Choose fewer and try again."), None, None, ""
        clinic = None if clinic in (None, "", NO_CLINIC) else clinic
        try:
            points = OperatingPoints(self.model.path, clinic)
            operating_point, threshold = points.threshold(operating_point)
        except ToolkitError as e:
            return "", str(e), None, None, ""
        messages, readable = [], []
        for path in files:
            size = path.stat().st_size
            if size > self.max_bytes:
                messages.append(f"{path.name}: {size / 1e6:.1f} MB, over the page's limit of "
                                f"{self.max_bytes / 1e6:g} MB; not read")
            else:
                readable.append(path)
        metadata = patient_metadata(age, sex, site, len(readable))
        cards, rows = [], []
        for i, result in self.model.classify(readable, metadata, points.tta):
            name = readable[i].name
            if isinstance(result, ToolkitError):  # unreadable, truncated, too small: say so on that file
                messages.append(f"{name}: {result.problem}")
                continue
            row = prediction_row(name, result, threshold, operating_point, points.tta, points.calibration)
            rows.append(row)
            cards.append(self.card(readable[i], result, row, metadata[i:i + 1]))
        line = (f"Model {self.describe()}. Operating point {operating_point}, threshold {threshold:.3f}"
                + (" on the model's probability (calibrated to clinic " + clinic + ")" if clinic else "")
                + ("; test-time augmentation" if points.tta else "") + ". For research and teaching: not a diagnosis, "
                "and no substitute for a clinician's examination.")
        csv_path = None
        if rows:
            csv_path = self.scratch / uuid.uuid4().hex / "predictions.csv"
            csv_path.parent.mkdir(parents=True)
            write_csv(pd.DataFrame(rows), csv_path)
        text = "\n".join(f"- {html.escape(m, quote=False)}" for m in messages)  # a file name is no markup
        return "\n".join(cards), text, pd.DataFrame(rows) if rows else None, csv_path and str(csv_path), line

    def card(self, path, result, row, metadata):
        """One image's result: the original, the overlay and the Grad-CAM map side by side, the
        probability and decision, and the class bars."""
        rgb = read_rgb(path)
        prepared = result["prepared"]
        pictures = [("image", rgb), ("outline and decision", overlay_image(rgb, prepared, row["decision"],
                                                                            result["prob"], row.get("top_class")))]
        cam = self.gradcam(prepared, metadata, rgb.shape)
        if cam is not None:
            pictures.append(cam)
        figures = "".join(f'<figure><img alt="{html.escape(title)}" src="{data_url(image)}">'
                          f"<figcaption>{html.escape(title)}</figcaption></figure>" for title, image in pictures)
        decision = row["decision"]
        bars = ""
        if "top_class" in row:
            bars = "<div class='classes'>" + "".join(
                f"<div class='bar' data-class='{code}' data-prob='{row['prob_' + code]:.6f}'>"
                f"<span class='name' title='{DX_NAMES[code]}'>{code}</span>"
                f"<span class='track'><span class='fill' style='width:{100 * row['prob_' + code]:.1f}%'></span></span>"
                f"<span class='value'>{row['prob_' + code]:.2f}</span></div>" for code in DX_CODES) + "</div>"
        return (f"<div class='result' data-file='{html.escape(row['file'])}' data-prob='{row['malignancy_prob']:.8f}'>"
                f"<h3>{html.escape(row['file'])}</h3><div class='pictures'>{figures}</div>"
                f"<p class='verdict {decision.replace(' ', '-')}'>malignancy probability "
                f"<b class='prob'>{row['malignancy_prob']:.3f}</b>: <b class='decision'>{decision}</b>"
                + (f"; most likely <b class='top-class'>{row['top_class']}</b> ({DX_NAMES[row['top_class']]}) "
                   f"{row['top_class_prob']:.2f}" if "top_class" in row else "") + "</p>"
                + (f"<p class='disagree'>The two answers disagree: {disagreement(row)}. The decision, at its "
                   "validated operating point, is the answer to read; the class is the model's guess.</p>"
                   if disagreement(row) else "") + f"{bars}</div>")

    def gradcam(self, prepared, metadata, photo_shape):
        """(title, map) of the first model on the input it reads; None for a model of two views. A
        network that reads the whole photo reads it squeezed square: its map is shown stretched back
        to the photo's proportions, beside the photo."""
        model, checkpoint = self.explained
        if checkpoint["input"] == "both":
            return None
        arrays = {"full": prepared["image"][None], "crop": prepared["crop"][None], "mask": prepared["mask_small"][None]}
        image = model_inputs(arrays, [0], checkpoint["input"], checkpoint["input_size"])
        device = next(model.parameters()).device
        cam = gradcam_maps(model, image, checkpoint["normalisation"], device, checkpoint["task"],
                           metadata if checkpoint.get("metadata") else None, checkpoint["arch"])[0]
        view = {"full": "whole image", "masked": "masked image"}.get(checkpoint["input"], checkpoint["input"])
        title = "Grad-CAM" + (" (first model)" if len(self.model.models) > 1 else "") + f" on the {view}"
        picture = heat_overlay(image[0], cam)
        if checkpoint["input"] in ("full", "masked"):
            import cv2
            height, width = photo_shape[:2]
            side = picture.shape[0] / max(height, width)
            picture = cv2.resize(picture, (round(width * side), round(height * side)), interpolation=cv2.INTER_LINEAR)
        return title, picture


def data_url(rgb):
    """A picture inline in the page (JPEG), so that it is never a file outside the scratch folder."""
    import cv2
    scale = min(1.0, SHOWN_SIDE / max(rgb.shape[:2]))  # the aspect kept, as the photo was taken
    small = cv2.resize(rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)), interpolation=cv2.INTER_AREA) \
        if scale < 1 else rgb
    ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(small[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 88])
    return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode()


CSS = """
.result { border: 1px solid #ddd; border-radius: 8px; padding: 10px; margin-bottom: 12px; }
.result h3 { margin: 0 0 6px 0; font-size: 1em; }
.pictures { display: flex; flex-wrap: wrap; gap: 8px; }
.pictures figure { margin: 0; } .pictures img { max-width: 320px; max-height: 240px; display: block; }
.pictures figcaption { font-size: 0.8em; color: #666; }
.verdict.malignant b.decision { color: #c0392b; } .verdict.benign b.decision { color: #1e8449; }
.disagree { color: #9a6700; }
.classes { max-width: 420px; } .bar { display: flex; align-items: center; gap: 6px; font-size: 0.85em; }
.bar .name { width: 3.5em; } .bar .track { flex: 1; background: #eee; height: 0.8em; border-radius: 3px; }
.bar .fill { display: block; background: #5b7db1; height: 100%; border-radius: 3px; }
.bar .value { width: 2.5em; text-align: right; }
"""


def build(page):
    import gradio as gr
    with gr.Blocks(title="Skin lesion classifier (local)", analytics_enabled=False,
                   delete_cache=(600, 3600)) as blocks:
        gr.Markdown("## Skin lesion classifier\nDrop dermoscopic images of skin lesions (or pick them). Each is "
                    "segmented, scored for malignancy and, where the model has them, for the seven HAM10000 "
                    "classes. Runs on this machine only. For research and teaching, not a diagnosis.")
        with gr.Row():
            with gr.Column(scale=2):
                files = gr.File(label="images", file_count="multiple", file_types=["image"], type="filepath",
                                elem_id="upload")
                run = gr.Button("Classify", variant="primary", elem_id="classify")
            with gr.Column(scale=1):
                point = gr.Dropdown(page.points, value=page.start_point, label="operating point")
                clinic = gr.Dropdown(page.clinics, value=page.start_clinic, label="clinic calibration",
                                     info=None if len(page.clinics) > 1 else
                                     "this model has none: calibrate.py makes one from a clinic's labelled images")
                with gr.Accordion("patient (for a model trained with age, sex and site)", open=False,
                                  visible=page.model.reads_metadata):
                    age = gr.Number(label="age", minimum=0, maximum=120, value=None)
                    sex = gr.Dropdown(["", *SEXES], value="", label="sex")
                    site = gr.Dropdown(["", *SITES], value="", label="site")
        messages = gr.Markdown(elem_id="messages")
        results = gr.HTML(elem_id="results")
        line = gr.Markdown(elem_id="model-line")
        table = gr.Dataframe(label="this batch (the same columns as predict.py's CSV)", interactive=False,
                             elem_id="table")
        download = gr.File(label="download the table as CSV", elem_id="download")
        inputs = [files, age, sex, site, point, clinic]
        outputs = [results, messages, table, download, line]
        run.click(page.classify, inputs, outputs)
        files.upload(page.classify, inputs, outputs)
    return blocks


@one_line_errors
def main(args):
    started = time.time()
    # a bad folder or calibration ends here, before Gradio's import and the networks' load
    model = ModelFolder(args.run, args.clinic, args.engine, args.device)
    scratch = Path(tempfile.mkdtemp(prefix="lesion-app-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # atexit's clean-up runs on a plain kill too
    # uploads inside the scratch folder, and whatever else Gradio keeps (6.x: vibe_edit_history): set
    # before its first import, which reads it once
    os.environ["GRADIO_TEMP_DIR"] = str(scratch / "uploads")
    try:
        import gradio  # noqa: F401  (only to say clearly what is missing)
    except ImportError:
        fail("requirements-app.txt", "the page needs its optional requirements: pip install -r requirements-app.txt "
             "(or make app)")
    page = Page(args, scratch, model)
    import gradio as gr
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    print(f"serving {page.describe()} at http://{args.host}:{args.port} (Ctrl+C stops it)", flush=True)
    build(page).queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, max_file_size=f"{args.max_mb}mb", theme=theme, css=CSS,
        footer_links=[], show_error=False, quiet=True, ssr_mode=False, share=False, prevent_thread_lock=True)
    print(f"up in {time.time() - started:.1f} s", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopped")


if __name__ == "__main__":
    for name, value in {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "GRADIO_SSR_MODE": "False",
                        "DO_NOT_TRACK": "1"}.items():
        os.environ.setdefault(name, value)
    main(parse_args())
