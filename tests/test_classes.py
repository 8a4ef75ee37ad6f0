"""The seven classes beside malignancy (issue 34): a model folder's classes.pt, what predict.py and
evaluate.py make of it, the per-class figures and their intervals over lesions, label smoothing, and
the recipe study's rules (bench/seven_classes.py)."""
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, trained_with_thresholds

import common
import evaluate
import export_model
import networks
import predict
import train

sys.path.insert(0, str(ROOT / "bench"))
import seven_classes  # noqa: E402
import study2  # noqa: E402

CLASS_COLUMNS = [f"prob_{code}" for code in common.DX_CODES]


@pytest.fixture(scope="module")
def class_run(synthetic_cache, tmp_path_factory):
    """A 7-class run on the binary run's cache, so that both read one preparation."""
    return trained_with_thresholds(synthetic_cache, tmp_path_factory.mktemp("runs") / "classes", "--task",
                                   "multiclass", "--class-weights", "balanced", "--epochs", "2", "--aug", "basic",
                                   "--label-smoothing", "0.1")


@pytest.fixture(scope="module")
def folders(trained_run, class_run, tmp_path_factory):
    """The same binary run exported alone and with the 7-class run beside it."""
    root = tmp_path_factory.mktemp("models")
    export_model.main(export_model.parse_args(["--run", str(trained_run), "--out", str(root / "binary")]))
    export_model.main(export_model.parse_args(["--run", str(trained_run), "--classes", str(class_run),
                                               "--out", str(root / "both")]))
    return root / "binary", root / "both"


def test_a_folder_with_classes_keeps_malignancy_and_adds_the_seven_classes(folders, class_run, synthetic_data,
                                                                          synthetic_cache, tmp_path, capsys):
    binary, both = folders
    assert (both / common.CLASS_MODEL_FILE).is_file() and not (binary / common.CLASS_MODEL_FILE).exists()
    weights = torch.load(both / common.CLASS_MODEL_FILE, weights_only=True)["model"].values()
    assert {w.dtype for w in weights if w.is_floating_point()} == {torch.float16}  # compact, as model.pt
    files = [str(p) for p in sorted((synthetic_data / "images").iterdir())[:4]]
    for folder in folders:
        predict.main(predict.parse_args(["--run", str(folder), *files, "--out", str(tmp_path / f"{folder.name}.csv"),
                                         "--overlay", str(tmp_path / folder.name)]))
    printed = capsys.readouterr().out
    alone, with_classes = (pd.read_csv(tmp_path / f"{name}.csv") for name in ("binary", "both"))
    # malignancy and its decision are exactly the binary model's
    np.testing.assert_array_equal(alone["malignancy_prob"], with_classes["malignancy_prob"])
    assert list(alone["decision"]) == list(with_classes["decision"])
    assert "top_class" not in alone.columns and not set(CLASS_COLUMNS) & set(alone.columns)
    np.testing.assert_allclose(with_classes[CLASS_COLUMNS].sum(axis=1), 1.0, atol=1e-5)
    assert list(with_classes["top_class"]) == [common.DX_CODES[k] for k in with_classes[CLASS_COLUMNS].to_numpy()
                                               .argmax(axis=1)]
    np.testing.assert_allclose(with_classes["top_class_prob"], with_classes[CLASS_COLUMNS].max(axis=1))
    # answers_agree: the class is malignant exactly where the decision is, else the table says so
    agree = [int((top in common.MALIGNANT_DX) == (decision == "malignant"))
             for top, decision in zip(with_classes["top_class"], with_classes["decision"])]
    assert list(with_classes["answers_agree"]) == agree
    for row in with_classes.itertuples():  # printed beside malignancy, as "bkl 0.71" (a long path shortened)
        kind = "malignant" if row.top_class in common.MALIGNANT_DX else "benign"
        marker = [] if row.answers_agree else ["<-", "disagree:", "the", "class", "is", kind, "but", "the",
                                               "decision", row.decision]
        assert any(row.file.endswith(line.split()[0].removeprefix("...")) and
                   line.split()[1:] == [f"{row.malignancy_prob:.3f}", row.decision, row.top_class,
                                        f"{row.top_class_prob:.2f}", *marker]
                   for line in printed.splitlines() if line.strip())
    assert (f"{agree.count(0)} of {len(agree)} images: the most likely class and the malignancy decision disagree"
            in printed) == (0 in agree)
    # the class probabilities are classes.pt's, read from the images prepared as evaluate.py's cache
    # holds them (one preparation for both models), and the 7-class run's within its fp16 copy
    evaluate.main(evaluate.parse_args(["--run", str(both), "--cache", str(synthetic_cache), "--split", "all",
                                       "--bootstrap", "0", "--out-dir", str(tmp_path / "folder")]))
    evaluate.main(evaluate.parse_args(["--run", str(class_run), "--split", "all", "--bootstrap", "0",
                                       "--out-dir", str(tmp_path / "class_run")]))
    ids = [Path(f).stem for f in files]
    folder = pd.read_csv(tmp_path / "folder" / "test_probs.csv").set_index("image_id").loc[ids]
    run = pd.read_csv(tmp_path / "class_run" / "test_probs.csv").set_index("image_id").loc[ids]
    np.testing.assert_allclose(with_classes[CLASS_COLUMNS].to_numpy(), folder[CLASS_COLUMNS].to_numpy(), atol=1e-5)
    np.testing.assert_allclose(with_classes["malignancy_prob"], folder["prob"], atol=1e-5)
    np.testing.assert_allclose(folder[CLASS_COLUMNS].to_numpy(), run[CLASS_COLUMNS].to_numpy(), atol=0.02)


def test_evaluate_reports_the_classes_of_a_folder_with_intervals(folders, trained_run, tmp_path):
    binary, both = folders
    for folder in folders:
        evaluate.main(evaluate.parse_args(["--run", str(folder), "--bootstrap", "50",
                                           "--out-dir", str(tmp_path / folder.name)]))
    assert not (tmp_path / "binary" / "multiclass_metrics.csv").exists()
    with_classes = pd.read_csv(tmp_path / "both" / "metrics.csv")  # malignancy untouched; the answers' agreement beside
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "binary" / "metrics.csv"),
                                  with_classes.drop(columns="answers_agree"))
    assert with_classes["answers_agree"].between(0, 1).all()
    table = pd.read_csv(tmp_path / "both" / "multiclass_metrics.csv").set_index("class")
    test = pd.read_csv(tmp_path / "both" / "test_probs.csv")
    truth = [common.DX_CODES.index(dx) for dx in test["dx"]]
    predicted = test[CLASS_COLUMNS].to_numpy().argmax(axis=1)
    from sklearn.metrics import balanced_accuracy_score
    assert table.loc["macro", "recall"] == pytest.approx(balanced_accuracy_score(truth, predicted))
    held = table.drop("macro")
    held = held[held["support"] > 0]
    assert ((held["recall_lo"] <= held["recall"] + 1e-9) & (held["recall"] <= held["recall_hi"] + 1e-9)).all()
    counts = pd.read_csv(tmp_path / "both" / "confusion_matrix_7class.csv").set_index("true")
    assert counts.to_numpy().sum() == len(test) and list(counts.columns) == list(common.DX_CODES)
    report = (tmp_path / "both" / "report.md").read_text()
    assert "7 classes: balanced accuracy" in report and "| mel |" in report and common.CLASS_MODEL_FILE in report
    # the test-reading table (make reference-test) carries the per-class table of a folder with classes
    for name in ("config.json", "history.csv"):  # study2 names the run beside its evaluations
        (tmp_path / name).write_bytes((trained_run / name).read_bytes())
    study2.main(study2.parse_args(["--read", f"{tmp_path / 'binary'}:alone", f"{tmp_path / 'both'}:beside",
                                   "--out", str(tmp_path / "reading")]))
    reading = (tmp_path / "reading.md").read_text()
    assert "### alone" not in reading
    section = reading[reading.index("### beside: the seven classes"):].splitlines()
    macro = next(line for line in section if line.startswith("| macro |"))
    assert macro.split(" | ")[3].startswith(f"{table.loc['macro', 'recall']:.3f} [")  # with its interval
    assert sum(line.startswith("| ") for line in section) == 1 + len(common.DX_CODES) + 1  # header, rows, macro


def test_asking_a_binary_model_for_classes_is_one_line(folders, synthetic_data):
    binary, _ = folders
    image = str(sorted((synthetic_data / "images").iterdir())[0])
    for main, args in ((predict, [image, "--run", str(binary), "--classes"]),
                       (evaluate, ["--run", str(binary), "--classes"])):
        with pytest.raises(SystemExit) as exc:
            main.main(main.parse_args(args))
        assert str(exc.value).startswith(f"error: {common.shown(binary)}: gives malignancy only")


def test_export_takes_only_a_seven_class_run_prepared_alike(trained_run, class_run, synthetic_data, tmp_path):
    with pytest.raises(SystemExit, match="--classes takes a 7-class run"):
        export_model.main(export_model.parse_args(["--run", str(trained_run), "--classes", str(trained_run),
                                                   "--out", str(tmp_path / "m")]))
    other = tmp_path / "other_run"
    (other).mkdir()
    checkpoint = torch.load(class_run / "model.pt", weights_only=True)
    checkpoint["preprocess"] = {**checkpoint["preprocess"], "crop_margin": 0.3}
    torch.save(checkpoint, other / "model.pt")
    with pytest.raises(SystemExit, match="differently prepared images.*crop_margin"):
        export_model.main(export_model.parse_args(["--run", str(trained_run), "--classes", str(other),
                                                   "--out", str(tmp_path / "m")]))
    assert not (tmp_path / "m").exists()


def test_a_stale_classes_file_is_refused_where_it_is_read(folders, class_run, tmp_path):
    import shutil
    _, both = folders
    copy = tmp_path / "copy"
    shutil.copytree(both, copy)
    checkpoint = torch.load(copy / common.CLASS_MODEL_FILE, weights_only=True)
    torch.save({**checkpoint, "task": "binary", "num_outputs": 1}, copy / common.CLASS_MODEL_FILE)
    with pytest.raises(common.ToolkitError) as exc:
        common.load_class_model(copy, torch.device("cpu"), common.load_folder_models(copy, torch.device("cpu")))
    assert common.CLASS_MODEL_FILE in str(exc.value) and "\n" not in str(exc.value)


def test_per_class_intervals_resample_lesions_not_images():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 7, 300)
    probs = rng.dirichlet(np.ones(7), 300)
    probs[np.arange(300), truth] += rng.uniform(0, 1, 300)  # better than chance, not perfect
    probs /= probs.sum(axis=1, keepdims=True)
    figures = common.multiclass_figures(truth, probs)
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score
    precision, recall, _, _ = precision_recall_fscore_support(truth, probs.argmax(axis=1), labels=range(7))
    np.testing.assert_allclose(figures["precision"], precision)
    np.testing.assert_allclose(figures["recall"], recall)
    np.testing.assert_allclose(figures["roc_auc"], [roc_auc_score(truth == k, probs[:, k]) for k in range(7)])
    singles = evaluate.multiclass_intervals(truth, probs, np.arange(300), 200, seed=1)
    # every lesion photographed three times: the same lesions drawn, so the very same intervals,
    # where resampling images would narrow them as if there were 900 cases
    tripled = evaluate.multiclass_intervals(np.repeat(truth, 3), np.repeat(probs, 3, axis=0),
                                            np.repeat(np.arange(300), 3), 200, seed=1)
    for name in singles:
        np.testing.assert_allclose(singles[name], tripled[name])
    lo, hi = singles["balanced_accuracy"]
    assert lo < np.mean(recall) < hi


def test_label_smoothing_reaches_the_loss_and_only_crossentropy_takes_it():
    rows = pd.DataFrame({"malignant": [1] * 20 + [0] * 80, "dx": ["mel"] * 20 + ["nv"] * 80})
    args = train.parse_args(["--cache", "c", "--run-dir", "r", "--task", "multiclass", "--loss", "ce",
                             "--label-smoothing", "0.1"])
    criterion, _, _ = train.loss_and_targets(args, rows)
    assert criterion.label_smoothing == pytest.approx(0.1)
    with pytest.raises(common.ToolkitError, match="--label-smoothing"):
        train.loss_and_targets(train.parse_args(["--cache", "c", "--run-dir", "r", "--loss", "wbce",
                                                 "--label-smoothing", "0.1"]), rows)
    with pytest.raises(SystemExit):
        train.parse_args(["--cache", "c", "--run-dir", "r", "--label-smoothing", "0.9"])


def test_the_page_shows_the_seven_classes_as_bars_with_predicts_numbers(folders, synthetic_data, tmp_path):
    import app  # the page's classification needs none of its optional requirements
    _, both = folders
    page = app.Page(app.parse_args(["--run", str(both)]), tmp_path / "scratch")
    files = [str(p) for p in sorted((synthetic_data / "images").iterdir())[:3]]
    html_out, messages, _, csv_path, _ = page.classify(files, None, "", "", page.start_point, page.start_clinic)
    predict.main(predict.parse_args(["--run", str(both), *files, "--out", str(tmp_path / "predict.csv")]))
    expected, shown = pd.read_csv(tmp_path / "predict.csv"), pd.read_csv(csv_path)
    assert list(shown.columns) == list(expected.columns) and not messages
    np.testing.assert_allclose(shown[CLASS_COLUMNS].to_numpy(), expected[CLASS_COLUMNS].to_numpy(), atol=1e-5)
    import re
    bars = [(code, float(prob)) for code, prob in re.findall(r"data-class='(\w+)' data-prob='([\d.]+)'", html_out)]
    assert [code for code, _ in bars] == list(common.DX_CODES) * len(files)  # seven bars per image, in order
    np.testing.assert_allclose([prob for _, prob in bars], expected[CLASS_COLUMNS].to_numpy().ravel(), atol=2e-6)
    for row in expected.to_dict("records"):
        assert f"most likely <b class='top-class'>{row['top_class']}</b>" in html_out
    # where the two answers disagree the page says so, on that image's card alone
    assert html_out.count("<p class='disagree'>") == int((expected["answers_agree"] == 0).sum())


def test_a_head_on_the_frozen_network_reads_both_answers_in_one_pass(synthetic_cache, synthetic_data, tmp_path):
    size = ["--img-size", "32", "--input", "crop", "--metadata"]
    binary = trained_with_thresholds(synthetic_cache, tmp_path / "binary", "--epochs", "1", *size)
    head = trained_with_thresholds(synthetic_cache, tmp_path / "head", "--task", "multiclass", "--class-weights",
                                   "balanced", "--epochs", "2", *size, "--frozen-from", str(binary / "model.pt"))
    source = torch.load(binary / "model.pt", weights_only=True)["model"]
    ours = torch.load(head / "model.pt", weights_only=True)["model"]
    body = [name for name in source if not name.startswith("head.")]
    assert any("running_mean" in name for name in body)  # batch-norm statistics too stay the network's
    assert all(torch.equal(source[name], ours[name]) for name in body) and ours["head.weight"].shape[0] == 7
    for name, classes in (("alone", []), ("both", ["--classes", str(head)])):
        export_model.main(export_model.parse_args(["--run", str(binary), *classes, "--out", str(tmp_path / name)]))
    cpu = torch.device("cpu")
    models = common.load_folder_models(tmp_path / "both", cpu, "torch")
    shared = common.load_class_model(tmp_path / "both", cpu, models)
    assert shared[1]["shared"]
    index, arrays = common.load_cache(synthetic_cache)
    rows, metadata = index["row"][:16], common.metadata_features(index.iloc[:16])
    probs, class_probs = common.ensemble_probs(models, arrays, rows, cpu, tta=True, metadata=metadata,
                                               class_model=shared)
    alone, none = common.ensemble_probs(common.load_folder_models(tmp_path / "alone", cpu, "torch"), arrays, rows, cpu,
                                        tta=True, metadata=metadata)
    np.testing.assert_allclose(probs, alone, atol=1e-6)  # malignancy is the binary model's own
    # the folder's ONNX files (export_model.py writes them): one network pass for both answers there too
    onnx_models = common.load_folder_models(tmp_path / "both", cpu, "onnx")
    onnx_shared = common.load_class_model(tmp_path / "both", cpu, onnx_models)
    assert onnx_shared[1]["shared"] and isinstance(onnx_shared[0], common.OnnxNetwork)
    onnx_probs, onnx_classes = common.ensemble_probs(onnx_models, arrays, rows, cpu, tta=True, metadata=metadata,
                                                     class_model=onnx_shared)
    np.testing.assert_allclose(onnx_probs, probs, atol=1e-5)
    np.testing.assert_allclose(onnx_classes, class_probs, atol=1e-5)
    assert (tmp_path / "both" / common.CLASS_MODEL_FILE).stat().st_size < 100_000  # the head alone is stored
    with pytest.raises(common.ToolkitError, match="holds a head alone"):
        common.load_checkpoint(tmp_path / "both" / common.CLASS_MODEL_FILE)
    model, checkpoint = common.load_checkpoint(tmp_path / "both" / common.CLASS_MODEL_FILE,
                                               shared_body=models[0][1]["model"])
    _, separate = common.ensemble_probs(models, arrays, rows, cpu, tta=True, metadata=metadata,
                                        class_model=(networks.fold_batch_norms(model), checkpoint))
    np.testing.assert_allclose(class_probs, separate, atol=1e-5)  # and the classes the 7-class model's
    for flags, words in ((["--input", "full", "--metadata"], "has input 'crop'"), (["--input", "crop"], "--metadata")):
        with pytest.raises(SystemExit, match=words):
            train.main(train.parse_args(["--cache", str(synthetic_cache), "--run-dir", str(tmp_path / "bad"),
                                         "--task", "multiclass", "--img-size", "32", *flags,
                                         "--frozen-from", str(binary / "model.pt")]))


def test_the_recipe_rules_pair_seeds_and_judge_as_the_protocol_says(tmp_path):
    per_class = 50
    dx = np.repeat(common.DX_CODES, per_class)
    position = np.tile(np.arange(per_class), len(common.DX_CODES))

    def probs_file(name, correct):
        """val_probs.csv whose first `correct` images of every class are right (balanced accuracy
        correct / 50); the others are called the next class."""
        truth = np.array([common.DX_CODES.index(code) for code in dx])
        called = np.where(position < correct, truth, (truth + 1) % len(common.DX_CODES))
        probs = np.full((len(dx), len(common.DX_CODES)), 0.05)
        probs[np.arange(len(dx)), called] = 0.7
        run = tmp_path / name
        run.mkdir()
        pd.DataFrame({"image_id": [f"img{i:04d}" for i in range(len(dx))], "lesion_id": [f"les{i // 2:04d}"
                      for i in range(len(dx))], "dx": dx, **dict(zip(CLASS_COLUMNS, probs.T))}).to_csv(
            run / "val_probs.csv", index=False)
        return str(run)

    def compare(rule, arms, out):
        seven_classes.main(seven_classes.parse_args([*(f"--arm={name}={a},{b}" for name, (a, b) in arms.items()),
                                                     "--rule", rule, "--bootstrap", "20", "--out", str(out)]))
        return pd.read_csv(out.with_suffix(".csv")).set_index("arm")

    def verdicts(rule, arms):
        table = compare(rule, arms, tmp_path / f"{rule}_{len(list(tmp_path.iterdir()))}")
        return table, dict(table["passes"].iloc[1:])

    base = (probs_file("K0_s0", 35), probs_file("K0_s1", 35))  # 0.70 at both seeds
    better = (probs_file("S_s0", 37), probs_file("S_s1", 37))  # +0.04 at both
    uneven = (probs_file("U_s0", 39), probs_file("U_s1", 33))  # +0.08 and -0.04: mean +0.02
    near = (probs_file("K4_s0", 35), probs_file("K4_s1", 34))  # 0 and -0.02: mean -0.01
    far = (probs_file("F_s0", 33), probs_file("F_s1", 33))  # -0.04 at both
    table, passed = verdicts("keep", {"K0": base, "S": better, "U": uneven})
    assert np.isclose(table.loc["S", "difference"], 0.04) and np.isclose(table.loc["U", "difference"], 0.02)
    assert np.isclose(table.loc["U", "balanced_accuracy_seed1"], 0.66)
    assert passed == {"S": True, "U": False}  # keep: every seed at least level
    assert verdicts("screen", {"K0": base, "U": uneven})[1] == {"U": True}  # a screen judges the mean alone
    assert verdicts("ship", {"S": better, "K4": near, "F": far})[1] == {"K4": False, "F": False}
    assert verdicts("ship", {"K0": base, "K4": near, "F": far})[1] == {"K4": True, "F": False}
    # --decide applies the protocol to the full length's tables and names the run to export
    results = tmp_path / "results"

    def tables(**arms_by_table):
        for name, (rule, arms) in arms_by_table.items():
            compare(rule, arms, results / name)
        return seven_classes.decide(results, Path("runs/seven_full"))

    two_seeds = (probs_file("S2_s0", 37), probs_file("S2_s1", 38))
    reasons, run = tables(full=("keep", {"K0": base, "S": two_seeds}),
                          full_K4_vs_S=("ship", {"S": two_seeds, "K4": near}))
    assert run == Path("runs/seven_full/S_s1") and "K4 against S" in reasons[1]
    reasons, run = tables(full=("keep", {"K0": base, "S": uneven}), full_K4_vs_K0=("ship", {"K0": base, "K4": near}))
    assert run == Path("runs/seven_full/K4_s0") and "the recipe is K0" in reasons[0]
