"""Bad input, tried as a new user would, through the real command lines: each ends with one line
naming the file or flag (exit status 1) or is reported by name and skipped, never a traceback, a
hang, or a file written outside the output folder."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, SHARED_DATA, preprocessed, synthetic_dataset, trained_with_thresholds
from fake_remote import FakeRemote
from test_download import fetch, isic_images

HAM = SHARED_DATA / "ham10000_224"


def run_script(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / args[0]), *map(str, args[1:])], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def run_scripts_together(*commands, preexec_fns=None):
    """Several command lines at once, each a CompletedProcess in order: most of a short failing
    run is Python's and torch's start-up, which two cores share out. preexec_fns: one per command
    (or None), run in its child before the script starts."""
    processes = [subprocess.Popen([sys.executable, str(ROOT / command[0]), *map(str, command[1:])], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec_fn)
                 for command, preexec_fn in zip(commands, preexec_fns or [None] * len(commands))]
    done = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return done


def assert_one_line_error(out, *words):
    """Exit status 1 and one error line, on a line of its own after any progress bars."""
    assert out.returncode == 1, out.stderr
    *before, error, end = out.stderr.split("\n")
    assert error.startswith("error: ") and end == "", out.stderr
    assert all(not line.strip() or "%|" in line for line in before), repr(out.stderr)  # only progress bars came before it
    assert "Traceback" not in out.stderr and all(w in error for w in words), out.stderr


def files_under(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """60 synthetic images (both classes in each split): a bad-input test needs a model folder's
    files, not a good model, so this file trains its own small run in seconds."""
    return synthetic_dataset(tmp_path_factory.mktemp("small") / "synthetic", 60)


@pytest.fixture(scope="module")
def small_cache(small_data, tmp_path_factory):
    return preprocessed(small_data, tmp_path_factory.mktemp("small_cache") / "synthetic_32", 32, workers=1)


@pytest.fixture(scope="module")
def small_run(small_cache, tmp_path_factory):
    """One epoch at 32 px."""
    return trained_with_thresholds(small_cache, tmp_path_factory.mktemp("small_runs") / "run", "--epochs", "1")


def test_an_id_that_would_leave_the_folder_is_refused_by_fetch_data_and_preprocess(tmp_path):
    source = tmp_path / "source"
    (source / "images").mkdir(parents=True)
    first = pd.read_csv(HAM / "labels.csv").head(3)
    for name in first["filename"]:
        shutil.copy(HAM / name, source / name)
    labels = first[["image_id", "filename", "label"]].copy()
    labels.loc[1, "image_id"] = "../../escaped"
    labels.to_csv(source / "labels.csv", index=False)
    out = run_script("fetch_data.py", "--from-dir", source, "--out", tmp_path / "work" / "data", cwd=tmp_path)
    assert_one_line_error(out, "labels.csv", "line 3", "../../escaped")
    labels.loc[1, "image_id"], labels.loc[2, "filename"] = first.loc[1, "image_id"], "../../../etc/hostname"
    labels.to_csv(source / "labels.csv", index=False)
    out = run_script("fetch_data.py", "--from-dir", source, "--out", tmp_path / "work" / "data", cwd=tmp_path)
    assert_one_line_error(out, "labels.csv", "line 4", "leaves its folder")
    labels.loc[2, "filename"], labels["mask"] = first.loc[2, "filename"], ["", "", "../../secret.png"]
    labels.to_csv(source / "labels.csv", index=False)
    out = run_script("fetch_data.py", "--from-dir", source, "--out", tmp_path / "work" / "data", cwd=tmp_path)
    assert_one_line_error(out, "labels.csv", "line 4: mask '../../secret.png' leaves its folder")
    # a metadata.csv edited by hand: preprocess.py would name a mask file after the id
    data = tmp_path / "work" / "data2"
    (data / "images").mkdir(parents=True)
    meta = pd.DataFrame({"image_id": ["../../escaped"], "filename": ["images/a.jpg"], "lesion_id": ["L"],
                         "dx": ["nv"], "malignant": [0], "split": ["train"]})
    meta.to_csv(data / "metadata.csv", index=False)
    out = run_script("preprocess.py", "--data", data, "--out", tmp_path / "work" / "cache", cwd=tmp_path)
    assert_one_line_error(out, "metadata.csv", "../../escaped")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "escaped.png").exists()
    assert not (tmp_path / "work" / "cache").exists()


def test_an_isic_id_from_the_server_that_would_leave_the_folder_is_skipped(tmp_path):
    sample = pd.read_csv(HAM / "labels.csv").groupby("label").head(1).reset_index(drop=True)
    images = isic_images(sample)
    images.append({**images[0], "isic_id": "../../ISIC_0024400"})
    with FakeRemote(images) as remote:
        meta = fetch(remote, tmp_path / "out")
    assert len(meta) == len(sample)
    outside = [p for p in files_under(tmp_path) if p.parts[0] != "out"]
    assert [p.name for p in outside] == [".out.lock"]  # the run's lock beside its folder, nothing else


@pytest.fixture(scope="module")
def awkward_images(tmp_path_factory):
    """A folder of what users drop into predict.py: two real lesions with the same file name in
    different folders, a file name that is not UTF-8, a blank image, a 1x1 and a 4000x1 image and
    a JPEG cut short."""
    folder = tmp_path_factory.mktemp("awkward")
    real = HAM / pd.read_csv(HAM / "labels.csv")["filename"].iloc[0]
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    shutil.copy(real, folder / "a" / "lesion.jpg")
    shutil.copy(real, folder / "b" / "lesion.jpg")
    shutil.copy(real, os.fsdecode(bytes(folder / "c") + b"\xff\xfe.jpg"))
    cv2.imwrite(str(folder / "blank.png"), np.full((150, 200, 3), 200, np.uint8))
    cv2.imwrite(str(folder / "tiny.png"), np.zeros((1, 1, 3), np.uint8))
    cv2.imwrite(str(folder / "strip.png"), np.zeros((1, 4000, 3), np.uint8))
    (folder / "truncated.jpg").write_bytes(real.read_bytes()[:2000])
    return folder


def test_predict_skips_degenerate_images_flags_blank_ones_and_keeps_every_overlay(small_run, awkward_images,
                                                                                   tmp_path):
    out = run_script("predict.py", "--run", small_run, awkward_images, "--out", tmp_path / "pred.csv",
                     "--overlay", tmp_path / "overlays")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    skipped = [line for line in out.stdout.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 3 and all(any(name in line for line in skipped)
                                     for name in ("tiny.png", "strip.png", "truncated.jpg")), out.stdout
    pred = pd.read_csv(tmp_path / "pred.csv")
    assert len(pred) == 4
    by_name = {os.path.basename(f): row for f, row in zip(pred["file"], pred.itertuples())}
    assert by_name["blank.png"].decision == "no lesion found" and by_name["blank.png"].mask_ok == 0
    assert "c\\xff\\xfe.jpg" in by_name  # the name that is not UTF-8, escaped
    lesions = pred[pred["file"].str.endswith("lesion.jpg")]
    assert set(lesions["decision"]) <= {"benign", "malignant"}
    assert lesions["overlay"].nunique() == 2  # same file name in two folders: two overlays
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == sorted(pred["overlay"])


def test_predict_checks_its_output_folder_before_predicting(small_run, awkward_images, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    out = run_script("predict.py", "--run", small_run, awkward_images, "--out", tmp_path / "a_file" / "pred.csv")
    assert_one_line_error(out, "a_file", "cannot be written")
    assert "predicting" not in out.stderr  # no image was read


def test_fetch_data_reports_degenerate_images_and_imports_the_rest(awkward_images, tmp_path):
    names = ["a/lesion.jpg", "blank.png", "tiny.png", "strip.png", "truncated.jpg"]
    pd.DataFrame({"image_id": [f"I{k}" for k in range(len(names))], "filename": names,
                  "label": "nv"}).to_csv(tmp_path / "labels.csv", index=False)
    out = run_script("fetch_data.py", "--from-dir", awkward_images, "--labels", tmp_path / "labels.csv",
                     "--assign-split", "test", "--out", tmp_path / "data")
    assert out.returncode == 0, out.stderr
    meta = pd.read_csv(tmp_path / "data" / "metadata.csv")
    assert sorted(meta["image_id"]) == ["I0", "I1"]
    assert "skipped 3 of 5 images" in out.stdout


def test_a_second_run_on_the_same_output_folder_ends_with_one_line(small_data, tmp_path):
    import common
    cache = tmp_path / "cache"
    common.lock_output(cache)  # this test process is the first run, still writing
    try:
        out = run_script("preprocess.py", "--data", small_data, "--img-size", "24", "--out", cache)
        assert_one_line_error(out, str(cache), "another run")
        assert not cache.exists()
    finally:
        common._HELD_LOCKS.pop(cache.with_name(".cache.lock")).close()


def test_a_cache_missing_an_array_is_rebuilt_not_taken_as_up_to_date(small_data, tmp_path):
    args = ["preprocess.py", "--data", small_data, "--img-size", "24", "--out", tmp_path / "cache",
            "--workers", "1"]
    import common
    import preprocess
    preprocess.main(preprocess.parse_args(list(map(str, args[1:]))))  # the first run, in this process
    common._HELD_LOCKS.pop(tmp_path / ".cache.lock").close()  # as the first run's exit would
    (tmp_path / "cache" / "crops.npy").unlink()  # what an interrupted second writer used to leave
    out = run_script(*args)
    assert out.returncode == 0 and "up to date" not in out.stdout
    assert (tmp_path / "cache" / "crops.npy").is_file()


@pytest.mark.parametrize("prob, words", [("", ["line 3", "prob"]), ("nan", ["line 3", "prob"]),
                                         ("high", ["line 3", "'high'"]), ("1.5", ["line 3", "1.5"])])
def test_a_bad_value_in_val_probs_names_the_file_line_and_field(small_run, tmp_path, prob, words):
    run = tmp_path / "run"
    run.mkdir()
    val = pd.read_csv(small_run / "val_probs.csv", dtype=str)
    val.loc[1, "prob"] = prob
    val.to_csv(run / "val_probs.csv", index=False)
    out = run_script("threshold.py", "--run", run)
    assert_one_line_error(out, "val_probs.csv", *words)
    assert not (run / "thresholds.json").exists()


def test_a_malformed_thresholds_json_names_the_file(small_run, small_data, tmp_path):
    """Three malformed files, each given to evaluate.py and predict.py, all six runs at once."""
    runs, commands = [], []
    for k, content in enumerate(['[0.5, 0.3]', '{"thresholds": {"recall_target": "0.4"}}', '{"thresholds": []}']):
        run = tmp_path / f"run{k}"
        run.mkdir()
        shutil.copy(small_run / "model.pt", run / "model.pt")
        (run / "thresholds.json").write_text(content)
        runs += [run, run]
        commands += [["evaluate.py", "--run", run, "--bootstrap", "0"],
                     ["predict.py", "--run", run, small_data / "images", "--out", run / "p.csv"]]
    for run, out in zip(runs, run_scripts_together(*commands)):
        assert_one_line_error(out, "thresholds.json")
        assert "predicting" not in out.stderr  # ended before any image was read
        assert not (run / "p.csv").exists() and not (run / "metrics.csv").exists()


def test_resume_names_a_missing_or_foreign_checkpoint_and_a_full_disk_keeps_the_previous_ones(
        small_run, small_cache, tmp_path):
    """train.py --resume beside small_run's checkpoints, four runs at once: with model.pt gone;
    with a checkpoint of another task; with a cache prepared otherwise than the one it trained on (a
    make default changed since); on a disk that fills while it saves the next epoch (a file size
    limit below a checkpoint's size stands in for one). Each ends with one line naming the file,
    and the full disk leaves the previous model.pt and last.pt intact for the next --resume."""
    import resource
    lacking, foreign, full, other = tmp_path / "lacking", tmp_path / "foreign", tmp_path / "full", tmp_path / "other"
    other_cache = tmp_path / "other_cache"
    shutil.copytree(small_cache, other_cache)
    key = json.loads((other_cache / "cache_key.json").read_text())
    (other_cache / "cache_key.json").write_text(json.dumps({**key, "crop_fit": "pad"}))
    for run in (lacking, foreign, full, other):
        run.mkdir()
        shutil.copy(small_run / "last.pt", run / "last.pt")
        if run != lacking:
            shutil.copy(small_run / "model.pt", run / "model.pt")
    before = {name: (full / name).read_bytes() for name in ("model.pt", "last.pt")}

    def small_disk():  # room for the logs, not for a 14 MB checkpoint
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, 1024 * 1024))
    args = ["train.py", "--cache", small_cache, "--batch-size", "32", "--precision", "fp32", "--epochs", "5",
            "--resume", "--run-dir"]
    out_lacking, out_foreign, out_full, out_other = run_scripts_together(
        [*args, lacking], [*args, foreign, "--task", "multiclass"], [*args, full],
        [*args, other, "--cache", other_cache], preexec_fns=[None, None, small_disk, None])
    assert_one_line_error(out_lacking, "model.pt", "not found")
    assert_one_line_error(out_foreign, "last.pt", "does not fit this run")  # the checkpoint is a binary model's
    assert_one_line_error(out_other, "cache_key.json", "not the cache", "crop_fit")
    assert "resumed" not in out_other.stdout
    assert "resumed" in out_full.stdout, out_full.stdout  # an epoch was trained, and its save is what failed
    assert_one_line_error(out_full, ".pt", "could not be written")
    assert {name: (full / name).read_bytes() for name in before} == before
    assert not [p for p in full.iterdir() if p.name.startswith(".") and p.suffix != ".lock"]  # no temporary file left


def test_running_out_of_disk_space_is_one_line_and_leaves_no_half_cache(small_data, tmp_path):
    """A file size limit stands in for a full disk: writes past it fail as they would on one."""
    import resource

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    out = subprocess.run([sys.executable, str(ROOT / "preprocess.py"), "--data", str(small_data), "--img-size",
                          "64", "--out", str(tmp_path / "cache"), "--workers", "1"], capture_output=True, text=True,
                         timeout=300, preexec_fn=small_disk)
    assert_one_line_error(out, "could not be written")
    assert list(tmp_path.iterdir()) == [tmp_path / ".cache.lock"]  # no cache, whole or half


def test_a_preprocessing_worker_that_dies_ends_the_run_with_one_line(synthetic_data, tmp_path):
    """A worker killed mid-run (out of memory, a crash in native code) must not leave the pool
    waiting for it forever: the run ends with one line and no cache. The 240 images of conftest's
    data give the test time to find a worker before the run ends."""
    import signal
    import time
    process = subprocess.Popen([sys.executable, str(ROOT / "preprocess.py"), "--data", str(synthetic_data),
                                "--img-size", "64", "--work-size", "384", "--out", str(tmp_path / "cache"),
                                "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    deadline = time.monotonic() + 120
    worker = None
    while worker is None and time.monotonic() < deadline and process.poll() is None:
        for pid in children.read_text().split() if children.exists() else []:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:  # a pool worker, not multiprocessing's resource tracker
                worker = int(pid)
        time.sleep(0.05)
    assert worker is not None, "no pool worker appeared"
    os.kill(worker, signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=120)
    assert_one_line_error(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr),
                          "metadata.csv", "worker died")
    assert not (tmp_path / "cache").exists() and not (tmp_path / ".building.cache").exists()


def test_a_ground_truth_mask_that_is_gone_costs_its_score_not_the_run(small_data, tmp_path):
    data = tmp_path / "synthetic"
    shutil.copytree(small_data, data)
    metadata = pd.read_csv(data / "metadata.csv")
    gone, damaged = metadata["image_id"].iloc[0], metadata["image_id"].iloc[1]
    (data / metadata["mask"].iloc[0]).unlink()
    (data / metadata["mask"].iloc[1]).write_bytes(b"not a png")
    out = run_script("preprocess.py", "--data", data, "--img-size", "64", "--out", tmp_path / "cache", "--workers", "1")
    assert out.returncode == 0, out.stderr
    assert f"no mask score for {gone}" in out.stdout + out.stderr and f"no mask score for {damaged}" in out.stdout + out.stderr
    index = pd.read_csv(tmp_path / "cache" / "index.csv")
    scores = pd.read_csv(tmp_path / "cache" / "segmentation_scores.csv")
    assert len(index) == len(metadata) and set(scores["image_id"]) == set(metadata["image_id"]) - {gone, damaged}
    assert "2 masks unreadable" in out.stdout


MODEL_FILES_FROM_ELSEWHERE = [
    ({"model": "bare tensor"}, ["model.pt", "holds a Tensor"]),
    ({"num_outputs": 7}, ["model.pt", "do not fit", "7 output"]),
    ({"input": "sideways"}, ["model.pt", "input 'sideways'"]),
    ({"normalisation": {"mean": [0.5] * 3, "std": [0.5, 0.0, 0.5]}}, ["model.pt", "normalisation", "positive std"]),
    ({"arch": "alexnet"}, ["model.pt", "arch 'alexnet'"]),
]


def test_a_model_file_from_elsewhere_is_one_line_naming_file_field_and_value(small_run, small_data, tmp_path):
    """predict.py for each field; evaluate.py loads models the same way (load_folder_models), once."""
    import torch
    checkpoint = torch.load(small_run / "model.pt", weights_only=True)
    image = sorted((small_data / "images").iterdir())[0]
    commands = []
    for k, (change, _) in enumerate(MODEL_FILES_FROM_ELSEWHERE):
        run = tmp_path / f"run{k}"
        shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("*.png", "test_probs.csv"))
        torch.save(torch.zeros(3) if change == {"model": "bare tensor"} else {**checkpoint, **change}, run / "model.pt")
        commands.append(["evaluate.py", "--run", run, "--out-dir", tmp_path / f"eval{k}"] if "num_outputs" in change
                        else ["predict.py", image, "--run", run, "--out", tmp_path / f"p{k}.csv"])
    for k, ((change, words), out) in enumerate(zip(MODEL_FILES_FROM_ELSEWHERE, run_scripts_together(*commands))):
        try:
            assert_one_line_error(out, *words)
        except AssertionError as e:
            raise AssertionError(f"model.pt changed by {change}: {e}") from None
        assert not (tmp_path / f"p{k}.csv").exists() and not (tmp_path / f"eval{k}").exists()
