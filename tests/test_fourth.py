"""The fourth edition's levers (docs/fourth_edition.md): one network for both answers (--task
joint), screens of a fixed size (--epoch-size), source-balanced sampling, the resolution and frame
guards, and the ISIC Archive's site words read in training and in every later reading."""
import sys

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


def test_an_epoch_of_fixed_size_draws_every_image_once_before_any_twice():
    targets = torch.zeros(10, dtype=torch.long)
    orders = [train.epoch_order(targets, "none", seed=3, epoch=e, size=4) for e in range(5)]
    assert all(len(order) == 4 for order in orders)
    drawn = torch.cat(orders).tolist()  # 20 draws: two whole passes over the 10 images
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10))
    assert torch.equal(train.epoch_order(targets, "none", seed=3, epoch=2, size=4), orders[2])  # a resumed run
    assert len(train.epoch_order(targets, "none", seed=3, epoch=0)) == 10  # by default all, once


def test_the_source_sampler_draws_each_source_equally_often():
    groups = torch.tensor([0] * 90 + [1] * 10)
    order = train.epoch_order(torch.zeros(100, dtype=torch.long), "source", seed=0, epoch=0, groups=groups, size=4000)
    share = float((groups[order] == 1).float().mean())
    assert 0.45 < share < 0.55, share
    # the class sampler reads the class of a joint target, (malignant, class index)
    joint = torch.stack([torch.zeros(100, dtype=torch.long), groups], dim=1)
    order = train.epoch_order(joint, "balanced", seed=0, epoch=0, size=4000)
    assert 0.45 < float((groups[order] == 1).float().mean()) < 0.55


def test_the_resolution_guard_blurs_to_the_smallest_sources_side_and_keeps_the_rest():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8))
    torch.manual_seed(0)
    low = train.low_resolution(images, 16, p=1.0)
    assert low.dtype == torch.uint8 and low.shape == images.shape
    # noise brought to 16 px and back loses most of its detail: neighbouring pixels become alike
    assert (low[:, 1:].float() - low[:, :-1].float()).abs().mean() < 0.5 * (images[:, 1:].float()
                                                                            - images[:, :-1].float()).abs().mean()
    assert torch.equal(train.low_resolution(images, 16, p=0.0), images)


def test_the_frame_guard_darkens_the_corners_and_not_the_centre():
    images = torch.full((8, 64, 64, 3), 200.0)
    torch.manual_seed(0)
    framed = train.dark_frame(images.clone(), p=1.0)
    # a circle of radius 0.85 to 1.35 of the half side: the corners (1.41 away) fall beyond or on its soft edge
    assert (framed[:, 0, 0, 0] < framed[:, 32, 32, 0] - 50).all() and (framed[:, 32, 32] > 190).all()
    assert framed[:, 0, 0].mean() < 100
    assert torch.equal(train.dark_frame(images.clone(), p=0.0), images)


@pytest.fixture(scope="module")
def joint_run(synthetic_cache, tmp_path_factory):
    return trained_with_thresholds(synthetic_cache, tmp_path_factory.mktemp("four") / "joint", "--task", "joint",
                                   "--class-weights", "balanced", "--epochs", "2", "--img-size", "32", "--metadata",
                                   "--general-sites", "--epoch-size", "64",
                                   "--resolution-aug", "16", "--frame-aug", "0.3")


def test_one_network_gives_both_answers_from_one_pass(joint_run, synthetic_cache, synthetic_data, tmp_path):
    checkpoint = torch.load(joint_run / "model.pt", weights_only=True)
    assert (checkpoint["task"], checkpoint["num_outputs"], checkpoint["general_sites"]) == ("joint", 8, True)
    assert checkpoint["model"]["head.weight"].shape[0] == 8
    val = pd.read_csv(joint_run / "val_probs.csv")
    assert set(common.CLASS_COLUMNS) <= set(val.columns)
    np.testing.assert_allclose(val[common.CLASS_COLUMNS].sum(axis=1), 1, atol=1e-5)
    # malignancy is its own head's, not the malignant classes' sum
    assert not np.allclose(val["prob"], val[["prob_mel", "prob_bcc", "prob_akiec"]].sum(axis=1), atol=1e-3)
    history = pd.read_csv(joint_run / "history.csv")  # the epoch was chosen on both answers
    assert np.allclose(checkpoint["val_score"], ((history["val_auc"] + history["val_bal_acc"]) / 2).max())
    evaluate.main(evaluate.parse_args(["--run", str(joint_run), "--split", "val", "--bootstrap", "0", "--classes",
                                       "--out-dir", str(tmp_path / "val")]))
    assert (tmp_path / "val" / "multiclass_metrics.csv").is_file()
    scored = pd.read_csv(tmp_path / "val" / "test_probs.csv")
    np.testing.assert_allclose(scored[common.CLASS_COLUMNS].sum(axis=1), 1, atol=1e-5)
    # the two answers' agreement at each operating point, as predict.py's answers_agree counts it
    metrics = pd.read_csv(tmp_path / "val" / "metrics.csv")
    top = np.asarray(common.DX_CODES)[scored[common.CLASS_COLUMNS].to_numpy().argmax(axis=1)]
    top_malignant = np.isin(top, ["mel", "bcc", "akiec"])
    for row in metrics.to_dict("records"):
        assert row["answers_agree"] == pytest.approx(np.mean(top_malignant == (scored["prob"] >= row["threshold"])))
    assert "The two answers agree" in (tmp_path / "val" / "report.md").read_text()
    # exported, it predicts both answers on both engines alike
    export_model.main(export_model.parse_args(["--run", str(joint_run), "--out", str(tmp_path / "folder")]))
    index = pd.read_csv(synthetic_cache / "index.csv")
    files = [str(synthetic_data / name) for name in index[index["split"] == "val"]["filename"].head(4)]
    for engine in common.ENGINES:
        predict.main(predict.parse_args(["--run", str(tmp_path / "folder"), *files, "--engine", engine, "--classes",
                                         "--out", str(tmp_path / f"{engine}.csv")]))
    onnx, torch_ = (pd.read_csv(tmp_path / f"{engine}.csv") for engine in common.ENGINES)
    assert onnx["top_class"].isin(common.DX_CODES).all() and list(onnx["top_class"]) == list(torch_["top_class"])
    np.testing.assert_allclose(onnx[["malignancy_prob", *common.CLASS_COLUMNS]],
                               torch_[["malignancy_prob", *common.CLASS_COLUMNS]], atol=1e-4)


def test_general_sites_are_read_as_the_model_was_trained(joint_run, synthetic_cache, tmp_path, capsys):
    """A model trained with --general-sites reads 'anterior torso' as the HAM10000 sites it covers
    in evaluate.py too, and does not count it as unknown."""
    cache = tmp_path / "cache"
    import shutil
    shutil.copytree(synthetic_cache, cache)
    index = pd.read_csv(cache / "index.csv")
    index["localization"] = "anterior torso"
    index.to_csv(cache / "index.csv", index=False)
    evaluate.main(evaluate.parse_args(["--run", str(joint_run), "--cache", str(cache), "--split", "val",
                                       "--bootstrap", "0", "--out-dir", str(tmp_path / "val")]))
    assert "site the model does not know" not in capsys.readouterr().out
    features = common.metadata_features(index.head(1), general_sites=True)
    assert features[0, common.METADATA_FIELDS[2][1]:].sum() == pytest.approx(1.0)


def test_the_levers_refuse_what_they_cannot_do(synthetic_cache, tmp_path):
    for flags, words in ((["--general-sites"], "needs --metadata"),
                         (["--sampler", "source"], "needs a dataset of several sources"),
                         (["--task", "joint", "--loss", "ce"], "--loss bce or wbce"),
                         (["--class-loss-weight", "0.5"], "weighs the classes beside malignancy")):
        with pytest.raises(SystemExit, match=words):
            train.main(train.parse_args(["--cache", str(synthetic_cache), "--run-dir", str(tmp_path / "bad"),
                                         "--epochs", "1", "--img-size", "32", *flags]))


def test_the_class_loss_weight_scales_the_classes_term_and_not_malignancys():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 8), torch.tensor([[1, 0], [0, 1], [1, 2], [0, 3], [1, 4], [0, 6]])
    binary, classes = torch.nn.BCEWithLogitsLoss(), torch.nn.CrossEntropyLoss()
    bce, ce = binary(logits[:, 0], targets[:, 0].float()), classes(logits[:, 1:], targets[:, 1])
    for weight in (1.0, 0.5, 0.0):
        loss = train.JointLoss(binary, classes, weight)(logits, targets)
        assert torch.isclose(loss, bce + weight * ce), weight


def test_the_fourth_panel_reads_both_answers_and_applies_its_rule():
    """bench/panel.py --four on constructed scores: balanced accuracy over the classes a site holds
    (10 images or more; a class it lacks counts as a miss), paired differences, and the verdicts."""
    sys.path.insert(0, str(ROOT / "bench"))
    import panel
    dx = np.array(["mel"] * 20 + ["nv"] * 30 + ["bkl"] * 3)
    guess = np.zeros((len(dx), 7))
    guess[:, common.DX_CODES.index("nv")] = 1  # every image called nv
    assert panel.site_classes(dx) == ["mel", "nv"]
    assert common.top_class_balanced_accuracy(dx, guess, ["mel", "nv"]) == pytest.approx(0.5)
    guess[:10, common.DX_CODES.index("vasc")] = 2  # half the melanomas named a class the site lacks
    assert common.top_class_balanced_accuracy(dx, guess, ["mel", "nv"]) == pytest.approx(0.5)

    rng = np.random.default_rng(0)

    def table(skill):
        labels = (dx == "mel").astype(int)
        probs = np.clip(labels * skill + rng.uniform(0, 1, len(dx)) * (1 - skill), 0, 1)
        classes = rng.uniform(0, 1, (len(dx), 7))
        right = rng.uniform(0, 1, len(dx)) < skill
        classes[right, [common.DX_CODES.index(d) for d in dx[right]]] = 5
        frame = pd.DataFrame({"image_id": [f"I{k}" for k in range(len(dx))], "group": [f"L{k // 2}" for k in
                                                                                      range(len(dx))],
                              "label": labels, "dx": dx, "prob": probs})
        return frame.assign(**{c: classes[:, k] for k, c in enumerate(common.CLASS_COLUMNS)})

    arms = {"J": ["J_s0", "J_s1"], "better": ["b_s0", "b_s1"], "worse": ["w_s0", "w_s1"]}
    skills = {"J": 0.4, "better": 0.8, "worse": 0.1}
    rows = []
    for site, *_ in panel.FOUR_SITES:
        tables = {(name, s): table(skills[name]) for name in arms for s in range(2)}
        for row in panel.compare_site_four(tables, arms, 200, 0):
            rows.append({"site": site, "reading": "shown", "in_panel": True, **row})
    scores = pd.DataFrame(rows)
    better = scores[(scores["arm"] == "better") & (scores["site"] == "ph2")].iloc[0]
    assert better["bal_acc_difference"] > 0.1 and better["bal_acc_difference_lo"] > 0
    assert better["roc_auc_difference"] == pytest.approx(np.mean([better["roc_auc_difference_seed0"],
                                                                  better["roc_auc_difference_seed1"]]))
    verdict = panel.verdicts_four(scores, arms, "screen", {"better": False, "worse": False}).set_index("arm")
    assert verdict.loc["better", "passes"] and not verdict.loc["worse", "passes"]
    assert "bcn20000_val_roc_auc_difference" not in verdict.columns  # not a guard for arms not trained on it
    text = panel.markdown_four(scores, verdict.reset_index(), arms, "screen")
    assert "| better |" in text and "passes" in text and "fails" in text


def test_the_ship_rule_asks_higher_balanced_accuracy_and_the_ranking_kept():
    """--rule ship ("What ships"): a recipe replaces the model when its panel balanced accuracy is
    higher and its ranking falls no further than the keep rule allows (panel -0.005, a site -0.020,
    HAM10000 val -0.010); balanced accuracy may fall anywhere but the panel's mean."""
    sys.path.insert(0, str(ROOT / "bench"))
    import panel
    outside = [site for site, *_ in panel.FOUR_SITES if site not in panel.FOUR_GUARDS]
    changes = {"names": ({}, 0.100), "ranks": ({}, -0.001), "one_site": ({outside[0]: -0.025}, 0.100),
               "ham_val": ({"ham10000_val": -0.011}, 0.100), "panel": ({s: -0.006 for s in outside}, 0.100)}
    rows = []
    for site, *_ in panel.FOUR_SITES:
        for arm, (roc, bal) in {"REF": ({}, 0.0), **changes}.items():
            default = 0.050 if arm == "ranks" else -0.004
            difference = {"roc_auc": roc.get(site, default), "bal_acc": -0.200 if site == "ham10000_val" else bal}
            rows.append({"site": site, "reading": "shown", "in_panel": True, "arm": arm,
                         **{f"{m}{suffix}": (0.7 + d if suffix == "" else d) for m, d in difference.items()
                            for suffix in ("", "_difference", "_difference_seed0", "_difference_seed1")}})
    arms = {name: ["a", "b"] for name in ["REF", *changes]}
    verdict = panel.verdicts_four(pd.DataFrame(rows), arms, "ship", dict.fromkeys(arms, False)).set_index("arm")
    assert verdict["passes"].to_dict() == {"names": True, "ranks": False, "one_site": False, "ham_val": False,
                                           "panel": False}
    # the keep rule guards HAM10000 val's balanced accuracy (here -0.200), which the ship rule leaves free
    keep = panel.verdicts_four(pd.DataFrame(rows), arms, "keep", dict.fromkeys(arms, False)).set_index("arm")
    assert not keep["passes"].any()
    assert panel.rule_words(panel.FOUR_RULES["ship"]).startswith("balanced accuracy higher, neither panel figure "
                                                                 "below -0.005 / no limit")


def test_the_inference_only_arms_reweight_the_classes_and_leave_malignancy(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import panel
    rng = np.random.default_rng(1)
    dx = np.array(["nv"] * 60 + ["mel"] * 20 + ["bcc"] * 20)
    probs = rng.dirichlet(np.ones(7), len(dx))
    probs[np.arange(len(dx)), [common.DX_CODES.index(d) for d in dx]] += 0.5  # it knows the class...
    probs[:, common.DX_CODES.index("nv")] += 1.0  # ...but says nv too often, as a prior-heavy model does
    probs /= probs.sum(axis=1, keepdims=True)
    table = pd.DataFrame({"image_id": range(len(dx)), "dx": dx, "prob": rng.uniform(0, 1, len(dx))})
    table = table.assign(**dict(zip(common.CLASS_COLUMNS, probs.T)))
    biases = common.chosen_class_biases(dx, probs)
    tuned = panel.reweighted(table, np.exp(biases))
    classes = ["bcc", "mel", "nv"]
    before = common.top_class_balanced_accuracy(dx, probs, classes)
    after = common.top_class_balanced_accuracy(dx, tuned[common.CLASS_COLUMNS].to_numpy(), classes)
    assert after > before + 0.2 and biases[common.DX_CODES.index("nv")] < biases[common.DX_CODES.index("mel")]
    np.testing.assert_allclose(tuned[common.CLASS_COLUMNS].sum(axis=1), 1)
    assert tuned["prob"].equals(table["prob"])  # malignancy is the malignancy head's, unchanged
    np.testing.assert_allclose(common.with_class_biases(probs, biases), tuned[common.CLASS_COLUMNS].to_numpy())
    # logit adjustment: minus log prior is a division of each class probability by its prior
    prior = np.full(7, 0.1)
    prior[common.DX_CODES.index("nv")] = 0.4
    adjusted = panel.reweighted(table, 1 / prior)[common.CLASS_COLUMNS].to_numpy()
    expected = probs / prior
    np.testing.assert_allclose(adjusted, expected / expected.sum(axis=1, keepdims=True))


def test_a_recorded_run_reads_as_the_run_it_was_recorded_from(joint_run, synthetic_cache, tmp_path, monkeypatch):
    """bench/panel.py --record: a run's probabilities without its weights or the sites' labels, read
    back (labels from the caches) to the tables the run itself gives, with and without test-time
    augmentation; a reading never recorded, or another cache, gets one line."""
    sys.path.insert(0, str(ROOT / "bench"))
    import panel
    monkeypatch.setattr(panel, "FOUR_SITES", (("ham10000_val", "syn", "val", None, ("shown",)),
                                              ("isic2017", "syn", "all", None, ("hidden", "shown"))))
    pattern, recorded = str(synthetic_cache), tmp_path / "recorded" / joint_run.name
    live = {}
    for tta in (False, True):
        live[tta] = panel.score_run_four(joint_run, pattern, tmp_path / "keep", "cpu", tta=tta)
        panel.record_run(joint_run, live[tta], tmp_path / "recorded", tta)
    assert sorted(p.name for p in recorded.iterdir()) == sorted(
        ["config.json"] + [f"{site}{tta}.csv" for site in ("ham10000_val_shown", "isic2017_hidden", "isic2017_shown")
                           for tta in ("", "_tta")])
    assert list(pd.read_csv(recorded / "isic2017_hidden.csv").columns) == ["image_id", "prob", *common.CLASS_COLUMNS]
    # recorded again from the kept files (a second reading), the record is the same to the byte
    panel.record_run(joint_run, panel.score_run_four(joint_run, pattern, tmp_path / "keep", "cpu"),
                     tmp_path / "again", False)
    for path in (tmp_path / "again" / joint_run.name).glob("*.csv"):
        assert path.read_bytes() == (recorded / path.name).read_bytes(), path.name
    index = pd.read_csv(synthetic_cache / "index.csv")
    assert len(live[False]["isic2017", "hidden"]) == (index["split"] != "train").sum()  # its training images left out
    for tta in (False, True):
        again = panel.score_run_four(recorded, pattern, tmp_path / "keep", "cpu", tta=tta)
        assert again.keys() == live[tta].keys()
        for key, table in live[tta].items():
            pd.testing.assert_frame_equal(again[key], table, check_dtype=False, check_exact=True)
    assert not np.allclose(live[True]["ham10000_val", "shown"]["prob"], live[False]["ham10000_val", "shown"]["prob"])
    with pytest.raises(common.ToolkitError, match="is neither a trained run"):
        panel.score_run_four(tmp_path / "nowhere", pattern, tmp_path / "keep", "cpu")
    (recorded / "isic2017_shown_tta.csv").unlink()
    with pytest.raises(common.ToolkitError, match="isic2017_shown_tta.csv: missing: the run was not recorded"):
        panel.score_run_four(recorded, pattern, tmp_path / "keep", "cpu", tta=True)
    table = pd.read_csv(recorded / "ham10000_val_shown.csv")
    table.iloc[1:].to_csv(recorded / "ham10000_val_shown.csv", index=False)
    with pytest.raises(common.ToolkitError, match="holds other images than"):
        panel.score_run_four(recorded, pattern, tmp_path / "keep", "cpu")


def test_class_biases_chosen_on_val_move_every_class_answer_and_not_malignancy(joint_run, synthetic_cache,
                                                                               synthetic_data, tmp_path, capsys):
    """threshold.py --class-biases (JPB for a model folder): seven biases chosen on val_probs.csv,
    written to thresholds.json, raising the val balanced accuracy they were chosen on; the folder
    then moves every class answer by them (predict.py, a cache's probabilities) and no malignancy."""
    import shutil
    import threshold
    folder = tmp_path / "joint"
    shutil.copytree(joint_run, folder)
    index, arrays = common.load_cache(synthetic_cache)
    rows = index[index["split"] == "val"]["row"]
    plain = common.ModelFolder(folder, engine="torch").probs(arrays, rows)
    threshold.main(threshold.parse_args(["--run", str(folder), "--class-biases"]))
    points = common.read_json(folder / "thresholds.json")
    assert list(points["class_biases"]) == list(common.DX_CODES)
    assert points["class_balanced_accuracy"]["with"] >= points["class_balanced_accuracy"]["without"]
    assert "class biases" in capsys.readouterr().out
    biases = common.read_class_biases(folder)
    val = pd.read_csv(folder / "val_probs.csv")
    np.testing.assert_array_equal(biases, common.chosen_class_biases(val["dx"], val[common.CLASS_COLUMNS].to_numpy()))
    assert np.abs(biases).max() > 0  # (seed 0's tiny network: the search moved some class)
    model = common.ModelFolder(folder, engine="torch")
    probs, class_probs = model.probs(arrays, rows)
    np.testing.assert_array_equal(probs, plain[0])
    np.testing.assert_allclose(class_probs, common.with_class_biases(plain[1], biases), rtol=1e-6)
    files = [str(synthetic_data / name) for name in index[index["split"] == "val"]["filename"].head(6)]
    table, problems = model.predict(files)
    assert not problems
    answers = table[common.CLASS_COLUMNS].to_numpy()
    picked = [index.index[index["filename"] == name][0] for name in index[index["split"] == "val"]["filename"].head(6)]
    np.testing.assert_allclose(answers, model.probs(arrays, index.loc[picked, "row"])[1], atol=1e-5)
    assert list(table["top_class"]) == [common.DX_CODES[k] for k in answers.argmax(axis=1)]
    # a malformed entry is one line naming the file
    points["class_biases"] = {"mel": 1.0}
    common.write_json(points, folder / "thresholds.json")
    with pytest.raises(common.ToolkitError, match="thresholds.json: 'class_biases' must give a number for each"):
        common.ModelFolder(folder).class_biases


def test_the_panel_pairs_a_run_whose_weights_are_gone_by_its_record(joint_run, synthetic_cache, tmp_path, monkeypatch):
    """bench/panel.py --four --record end to end: the tables read from the runs themselves, and read
    again once their weights are gone (from the records alone), are the same to the last digit."""
    import shutil
    sys.path.insert(0, str(ROOT / "bench"))
    import panel
    monkeypatch.setattr(panel, "FOUR_SITES", tuple((site, "syn", split, source and "synthetic", readings)
                                                   for site, _, split, source,
                                                   readings in panel.FOUR_SITES))
    runs = [tmp_path / "runs" / f"J_s{s}" for s in (0, 1)]
    for run in runs:
        shutil.copytree(joint_run, run)
    arms = ["--arm", f"J={runs[0]},{runs[1]}", "--arm", f"JPB={runs[0]},{runs[1]}", "--adjust", "JPB=pb",
            "--arm", f"JTTA={runs[0]},{runs[1]}", "--tta", "JTTA"]
    common_flags = ["--four", "--rule", "keep", "--bootstrap", "20", "--cache-pattern", str(synthetic_cache),
                    "--record", str(tmp_path / "recorded"), *arms]
    panel.main(panel.parse_args([*common_flags, "--keep", str(tmp_path / "keep"), "--out", str(tmp_path / "live")]))
    for run in runs:
        shutil.rmtree(run)
    panel.main(panel.parse_args([*common_flags, "--keep", str(tmp_path / "keep2"), "--out", str(tmp_path / "again")]))
    assert sorted(p.name for p in (tmp_path / "recorded").iterdir()) == ["J_s0", "J_s1"]
    for suffix in (".csv", "_verdicts.csv"):
        live, again = (pd.read_csv(tmp_path / f"{name}{suffix}") for name in ("live", "again"))
        pd.testing.assert_frame_equal(live, again)
    live, again = ((tmp_path / f"{name}.md").read_text().splitlines() for name in ("live", "again"))
    assert "recorded/J_s0" in again[0] and live[1:] == again[1:]  # the first line names where the runs were read
    assert set(pd.read_csv(tmp_path / "live_verdicts.csv")["arm"]) == {"JPB", "JTTA"}


def test_a_joint_network_starts_from_a_binary_ones_malignancy_and_trains_on(synthetic_cache, joint_run, tmp_path):
    size = ["--img-size", "32", "--metadata"]
    binary = trained_with_thresholds(synthetic_cache, tmp_path / "binary", "--epochs", "1", *size)
    flags = ["--cache", str(synthetic_cache), "--arch", "efficientnet_lite0", "--task", "joint", "--class-weights",
             "balanced", *size, "--init-from", str(binary / "model.pt")]
    args = train.parse_args(["--run-dir", str(tmp_path / "start"), *flags])
    source, _ = common.load_checkpoint(binary / "model.pt")
    model, _ = networks.build_model("efficientnet_lite0", 8, False, None, True)
    train.initial_network(model, args, 32)
    images, metadata = torch.rand(4, 3, 32, 32), torch.rand(4, common.METADATA_SIZE)
    with torch.no_grad():
        started, own = model.eval()(images, metadata), source.eval()(images, metadata)
    torch.testing.assert_close(started[:, :1], own)  # its malignancy is the binary model's, to the last operation
    assert started.shape == (4, 8) and not torch.equal(started[:, 1:], torch.zeros(4, 7))
    # and everything then trains: the network moves away from its start
    run = trained_with_thresholds(synthetic_cache, tmp_path / "joint", *flags[4:], "--epochs", "1", "--lr", "1e-3")
    trained = torch.load(run / "model.pt", weights_only=True)
    assert (trained["task"], trained["num_outputs"]) == ("joint", 8)
    body = torch.load(binary / "model.pt", weights_only=True)["model"]
    assert not all(torch.equal(value, trained["model"][name]) for name, value in body.items() if name[:5] != "head.")
    for extra, words in ((["--task", "multiclass"], "--task joint"), (["--frozen-from", str(binary / "model.pt")],
                         "give one"), (["--init-from", str(joint_run / "model.pt")], "needs a binary one")):
        with pytest.raises(SystemExit, match=words):
            train.main(train.parse_args(["--run-dir", str(tmp_path / "bad"), *flags, *extra]))

    # linear probing, then fine-tuning: the class logits start from a 7-class head trained on the frozen network
    probe = trained_with_thresholds(synthetic_cache, tmp_path / "probe", "--task", "multiclass", "--class-weights",
                                    "balanced", "--epochs", "1", *size, "--frozen-from", str(binary / "model.pt"))
    args = train.parse_args(["--run-dir", str(tmp_path / "lp"), *flags, "--init-head", str(probe / "model.pt")])
    model, _ = networks.build_model("efficientnet_lite0", 8, False, None, True)
    train.initial_network(model, args, 32)
    prober, _ = common.load_checkpoint(probe / "model.pt")
    with torch.no_grad():
        started, own, classes = model.eval()(images, metadata), source(images, metadata), prober.eval()(images, metadata)
    torch.testing.assert_close(started, torch.cat([own, classes], dim=1))
    scratch = trained_with_thresholds(synthetic_cache, tmp_path / "scratch", "--task", "multiclass", "--epochs", "1",
                                      *size)
    for head, words in ((scratch, "was not trained on"), (joint_run, "needs a 7-class one")):
        with pytest.raises(SystemExit, match=words):
            train.main(train.parse_args(["--run-dir", str(tmp_path / "bad"), *flags, "--init-head",
                                         str(head / "model.pt")]))
    with pytest.raises(SystemExit, match="give --init-from too"):
        train.main(train.parse_args(["--run-dir", str(tmp_path / "bad"), *flags[:-2], "--init-head",
                                     str(probe / "model.pt")]))
