"""The inference engine (issue 44): a model folder's networks as ONNX files, checked against PyTorch
before they are written, run by ONNX Runtime where they are current and by PyTorch otherwise, the
two engines giving the same CSV; and an image over the size limit refused from its header, before
any decoding. Real images: HAM10000 images outside the study's test split and PH2's."""
import json
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, SHARED_DATA
from test_reference_model import HAM, REFERENCE, real_rows

import common
import export_model
import networks

PH2 = SHARED_DATA / "ph2"
WEIGHTS = ["model.pt", "segmenter.pt", "thresholds.json", "export.json"]


def weights_only_copy(folder):
    """The reference folder as committed: its weights, without ONNX files."""
    folder.mkdir()
    for name in WEIGHTS:
        shutil.copy(REFERENCE / name, folder / name)
    return folder


def real_images(n_ham=3, n_ph2=3):
    return ([HAM / name for name in real_rows(1, n_ham - 1)["filename"]] +
            [PH2 / name for name in pd.read_csv(PH2 / "labels.csv")["filename"].head(n_ph2)])


@pytest.fixture(scope="module")
def onnx_folder(tmp_path_factory):
    """A copy of the reference model with ONNX files checked on real images."""
    folder = weights_only_copy(tmp_path_factory.mktemp("engine") / "reference")
    images = tmp_path_factory.mktemp("check")
    for path in real_images(4, 4):
        (images / path.name).symlink_to(path)
    export_model.main(export_model.parse_args(["--onnx", str(folder), "--check-images", str(images)]))
    return folder


def predict(folder, files, out, *flags):
    result = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--run", str(folder), *map(str, files),
                             "--out", str(out), *flags], capture_output=True, text=True, timeout=300)
    return result


def test_each_network_is_written_as_onnx_checked_against_pytorch_on_real_images(onnx_folder):
    record = json.loads((onnx_folder / common.ONNX_RECORD).read_text())
    assert set(record["networks"]) == {"model.pt", "segmenter.pt"}
    assert record["checked_on"].startswith("8 images from ")
    for name, entry in record["networks"].items():
        assert (onnx_folder / entry["onnx"]).is_file()
        assert entry["source_sha256"] == common.file_digest(onnx_folder / name)
        assert entry["sha256"] == common.file_digest(onnx_folder / entry["onnx"])
        assert 0 <= entry["difference"] <= 1e-4
    # what the engine reads instead of the weights: every field of the checkpoint but the weights
    model = torch.load(onnx_folder / "model.pt", weights_only=True)
    fields = record["networks"]["model.pt"]["checkpoint"]
    assert {k: fields[k] for k in ("arch", "task", "input", "input_size", "normalisation", "preprocess")} == \
        {k: model[k] for k in ("arch", "task", "input", "input_size", "normalisation", "preprocess")}


def test_the_onnx_file_reads_plain_pixels_and_gives_pytorchs_logits(onnx_folder):
    """A caller in another language passes uint8 RGB pixels (and the metadata features): the
    normalisation is in the graph."""
    import onnxruntime
    network, checkpoint = common.load_checkpoint(onnx_folder / "model.pt")
    network = networks.for_inference(network)
    images = np.random.default_rng(0).integers(0, 256, (3, 160, 160, 3), dtype=np.uint8)
    metadata = np.zeros((3, common.METADATA_SIZE), np.float32)
    metadata[:, :2] = 0.5, 1  # age 60, known
    session = onnxruntime.InferenceSession(str(onnx_folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("image", "tensor(uint8)"),
                                                                 ("metadata", "tensor(float)")]
    ours = session.run(None, {"image": images, "metadata": metadata})[0]
    with torch.inference_mode():
        theirs = network(common.to_model_tensor(images, checkpoint["normalisation"]), torch.from_numpy(metadata))
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4)


def test_both_engines_give_the_same_csv_and_say_which_ran(onnx_folder, tmp_path):
    files = real_images(3, 3)
    outputs = {}
    for engine in common.ENGINES:
        result = predict(onnx_folder, files, tmp_path / f"{engine}.csv", "--engine", engine)
        assert result.returncode == 0, result.stderr
        assert ("(ONNX Runtime)" if engine == "onnx" else "(PyTorch)") in result.stdout
        outputs[engine] = pd.read_csv(tmp_path / f"{engine}.csv")
    onnx, torch_ = outputs["onnx"], outputs["torch"]
    assert list(onnx.columns) == list(torch_.columns) and "top_class" in onnx.columns
    numbers = [c for c in onnx.columns if pd.api.types.is_float_dtype(onnx[c])]
    assert "malignancy_prob" in numbers and "prob_mel" in numbers
    np.testing.assert_allclose(onnx[numbers], torch_[numbers], atol=1e-4)
    texts = [c for c in onnx.columns if c not in numbers]
    assert onnx[texts].equals(torch_[texts])
    # with no --engine: ONNX Runtime, where the folder has current ONNX files
    result = predict(onnx_folder, files[:1], tmp_path / "default.csv")
    assert result.returncode == 0 and "(ONNX Runtime)" in result.stdout, result.stderr


def test_evaluate_on_either_engine_gives_the_same_probabilities(onnx_folder, tmp_path):
    """evaluate.py reads a cache through the folder's engine; its probabilities match PyTorch's."""
    import evaluate
    import fetch_data
    import preprocess
    source = tmp_path / "source"
    source.mkdir()
    (source / "images").symlink_to(HAM / "images")
    rows = real_rows(2, 2)
    rows.drop(columns=["mask", "split"]).to_csv(source / "labels.csv", index=False)
    fetch_data.main(fetch_data.parse_args(["--from-dir", str(source), "--out", str(tmp_path / "data"),
                                           "--assign-split", "val"]))
    settings = common.preprocess_settings(torch.load(onnx_folder / "model.pt", weights_only=True)["preprocess"])
    preprocess.main(preprocess.parse_args([
        "--data", str(tmp_path / "data"), "--out", str(tmp_path / "cache"), "--cache-size", str(settings["cache_size"]),
        "--work-size", str(settings["work_size"]), "--crop-margin", str(settings["crop_margin"]),
        "--crop-fit", settings["crop_fit"], "--hair-removal", settings["hair_removal"],
        "--colour-constancy", settings["colour_constancy"], "--segmenter", "unet",
        "--segmenter-model", str(onnx_folder / "segmenter.pt")]))
    probs = {}
    for engine in common.ENGINES:
        evaluate.main(evaluate.parse_args(["--run", str(onnx_folder), "--cache", str(tmp_path / "cache"), "--split",
                                           "val", "--bootstrap", "0", "--engine", engine,
                                           "--out-dir", str(tmp_path / engine)]))
        probs[engine] = pd.read_csv(tmp_path / engine / "test_probs.csv").set_index("image_id")
    np.testing.assert_allclose(probs["onnx"][["prob", *common.CLASS_COLUMNS]],
                               probs["torch"].loc[probs["onnx"].index, ["prob", *common.CLASS_COLUMNS]], atol=1e-4)


def test_a_folder_without_current_onnx_files_runs_on_pytorch_or_says_why_not(onnx_folder, tmp_path):
    image = real_images(1, 0)[0]
    plain = weights_only_copy(tmp_path / "plain")
    result = predict(plain, [image], tmp_path / "p.csv")
    assert result.returncode == 0 and "(PyTorch)" in result.stdout, result.stderr
    result = predict(plain, [image], tmp_path / "q.csv", "--engine", "onnx")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert f"{plain}: has no ONNX files; export_model.py --onnx" in result.stderr
    assert not (tmp_path / "q.csv").exists()
    # weights changed since the ONNX files were made: they are never used
    stale = tmp_path / "stale"
    shutil.copytree(onnx_folder, stale)
    checkpoint = torch.load(stale / "model.pt", weights_only=True)
    checkpoint["model"]["head.bias"] = checkpoint["model"]["head.bias"] + 1
    torch.save(checkpoint, stale / "model.pt")
    result = predict(stale, [image], tmp_path / "r.csv")
    assert result.returncode == 0 and "(PyTorch)" in result.stdout, result.stderr
    result = predict(stale, [image], tmp_path / "s.csv", "--engine", "onnx")
    assert result.returncode == 1 and "model.onnx was made from another model.pt" in result.stderr, result.stderr


def test_an_export_with_onnx_out_leaves_the_folder_its_weights_alone(trained_run, tmp_path):
    """make export of models/reference: the ONNX files go where predict.py finds them, not into the
    folder, and export.json lists only what the folder holds."""
    folder, onnx = tmp_path / "model", tmp_path / "onnx"
    export_model.main(export_model.parse_args(["--run", str(trained_run), "--out", str(folder),
                                               "--onnx-out", str(onnx)]))
    held = sorted(p.name for p in folder.iterdir())
    assert not [name for name in held if name.endswith(".onnx") or name == common.ONNX_RECORD]
    assert sorted(json.loads((folder / "export.json").read_text())["sha256"]) == \
        [name for name in held if name != "export.json"]
    record = json.loads((onnx / common.ONNX_RECORD).read_text())
    assert record["networks"]["model.pt"]["source_sha256"] == common.file_digest(folder / "model.pt")
    assert (onnx / record["networks"]["model.pt"]["onnx"]).is_file()


def test_an_onnx_file_that_differs_from_pytorch_is_not_written(tmp_path, monkeypatch):
    folder = weights_only_copy(tmp_path / "reference")
    monkeypatch.setattr(export_model, "ONNX_TOLERANCE", 0.0)  # float32 rounding alone now exceeds it
    with pytest.raises(SystemExit) as ended:
        export_model.main(export_model.parse_args(["--onnx", str(folder)]))
    assert "differs from PyTorch's" in str(ended.value) and "not written" in str(ended.value)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(WEIGHTS)
    assert "generated lesion-like images" in str(ended.value)


def png_header(width, height, rows=b""):
    """A grayscale PNG that declares width x height; rows: its compressed pixel rows (none: the header
    alone, an image no decoder can finish)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) +
            chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def test_an_image_over_the_size_limit_is_refused_from_its_header_before_decoding(tmp_path):
    # 7,000 x 9,000 px of black: a valid PNG of 63 megapixels in 62 kB, which OpenCV would decode whole
    compressor = zlib.compressobj(9)
    row = b"\x00" * 7001
    data = b"".join(compressor.compress(row) for _ in range(9000)) + compressor.flush()
    big = tmp_path / "big.png"
    big.write_bytes(png_header(7000, 9000, data))
    bomb = tmp_path / "bomb.png"  # 900 megapixels declared: Pillow itself refuses it as a bomb
    bomb.write_bytes(png_header(30000, 30000))
    fine = real_images(1, 0)[0]
    # the children's peak memory, with and without the large images beside the same real one
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(r.returncode); print(r.stdout); print(r.stderr, file=sys.stderr); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)")
    peaks = {}
    for name, files in (("alone", [fine]), ("with", [big, bomb, fine])):
        result = subprocess.run([sys.executable, "-c", probe, sys.executable, str(ROOT / "predict.py"),
                                 *map(str, files), "--engine", "onnx", "--out", str(tmp_path / f"{name}.csv")],
                                capture_output=True, text=True, timeout=300)
        assert result.stdout.splitlines()[0] == "0", result.stderr
        assert len(pd.read_csv(tmp_path / f"{name}.csv")) == 1  # the rest are scored
        peaks[name] = int(result.stderr.strip().splitlines()[-1])
    assert f"skipped {big}: 7000x9000 px (63 megapixels) is over the 50-megapixel limit" in result.stdout
    assert f"skipped {bomb}: its header (900 megapixels) is over the 50-megapixel limit" in result.stdout
    # decoded, the 63 megapixels alone would be 189 MB of RGB (and its BGR copy as much again)
    assert peaks["with"] - peaks["alone"] < 60_000, peaks
    # the same limit holds for every reader of images: the one-line reason a caller gets
    with pytest.raises(common.ToolkitError) as ended:
        common.read_rgb(big)
    assert str(ended.value) == (f"{big}: 7000x9000 px (63 megapixels) is over the 50-megapixel limit "
                                "(dermoscopes give at most about 25): scale it down first")


def test_make_setup_leaves_the_reference_model_on_current_onnx_files():
    if not (common.onnx_dir(REFERENCE) / common.ONNX_RECORD).is_file():
        pytest.skip("models/reference has no ONNX files: make setup (or make test) writes them")
    networks = common.onnx_networks(REFERENCE, "onnx")
    assert set(networks) == {"model.pt", "segmenter.pt"}
    # made on this machine outside the shipped folder, which holds its weights once, within 25 MB
    assert all(path.parent == common.MACHINE_ONNX / "models" / "reference" for path in networks.values())
    assert not list(REFERENCE.glob("*.onnx")) and sum(p.stat().st_size for p in REFERENCE.iterdir()) <= 25 * 2**20
    # the rule that writes them: make setup, make test and the targets that read the reference model
    out = subprocess.run(["make", "-n", "-W", "models/reference/model.pt", "setup", "PYTHON=python3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert "export_model.py --onnx models/reference" in out.stdout, out.stdout + out.stderr
