"""bench/study.py: the study's table picks its best run by validation only."""
import importlib.util
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("study", ROOT / "bench" / "study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)

POINTS = ("default", "best_f1", "recall_target")


def fake_run(folder, val_auc, test_auc, task="binary", ph2=False):
    folder.mkdir(parents=True)
    args = {"arch": "efficientnet_lite0", "pretrained": True, "task": task, "loss": "wbce", "aug": "full",
            "input": "full"}
    (folder / "config.json").write_text(json.dumps({"args": args, "best_val_score": val_auc}))
    pd.DataFrame({"seconds": [60.0, 90.0]}).to_csv(folder / "history.csv", index=False)
    rows = []
    for k, point in enumerate(POINTS):
        row = {"operating_point": point, "threshold": 0.3 + 0.2 * k}
        for m in study.METRICS:
            value = test_auc if m == "roc_auc" else 0.5 + 0.1 * k
            row.update({m: value, f"{m}_lo": value - 0.05, f"{m}_hi": value + 0.05})
        rows.append(row)
    pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)
    if ph2:
        (folder / "ph2").mkdir()
        pd.DataFrame(rows).to_csv(folder / "ph2" / "metrics.csv", index=False)
        (folder / "ph2" / "roc_curve.png").write_bytes(b"ph2 roc")
    (folder / "roc_curve.png").write_bytes(folder.name.encode())
    if task == "multiclass":
        (folder / "confusion_matrix_7class.png").write_bytes(folder.name.encode())


def test_best_run_is_chosen_by_validation_not_test(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "1_baseline", val_auc=0.90, test_auc=0.95)
    fake_run(runs / "3_wbce_aug", val_auc=0.94, test_auc=0.88, ph2=True)  # best on validation, worst on test
    fake_run(runs / "6_multiclass", val_auc=0.99, test_auc=0.99, task="multiclass")  # val score is not an AUC
    out = tmp_path / "results" / "study"
    study.main(study.parse_args(["--runs", str(runs), "--out", str(out), "--plots", str(tmp_path / "plots")]))

    table = pd.read_csv(out.with_suffix(".csv"))
    assert set(table.loc[table["best_by_validation"], "stage"]) == {"3_wbce_aug", "6_multiclass"}
    best = table[table["best_by_validation"] & (table["task"] == "binary")]
    assert set(best["operating_point"]) == {"best_f1", "recall_target"}
    assert set(best["data"]) == {"internal test", "PH2"}
    baseline = table[table["stage"] == "1_baseline"]
    assert list(baseline["operating_point"]) == ["default", "recall_target"]
    assert table.loc[table["stage"] == "1_baseline", "train_minutes"].iloc[0] == 2.5
    assert (tmp_path / "plots" / "roc_curve.png").read_bytes() == b"3_wbce_aug"
    assert (tmp_path / "plots" / "ph2_roc_curve.png").is_file()
    assert (tmp_path / "plots" / "confusion_matrix_7class.png").read_bytes() == b"6_multiclass"
    assert "| 3_wbce_aug (best by val) | PH2 | best_f1 (t=0.500) |" in out.with_suffix(".md").read_text()


def test_an_ensemble_is_described_by_its_members_and_can_be_chosen(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "2_wbce", val_auc=0.92, test_auc=0.90)
    fake_run(runs / "3_wbce_aug", val_auc=0.93, test_auc=0.91)
    fake_run(runs / "8_ensemble", val_auc=None, test_auc=0.92)
    (runs / "8_ensemble" / "config.json").unlink()  # an ensemble trains nothing of its own
    (runs / "8_ensemble" / "history.csv").unlink()
    (runs / "8_ensemble" / "members.json").write_text(json.dumps(
        {"members": ["../2_wbce", "../3_wbce_aug"], "task": "binary", "val_score": 0.95}))
    fake_run(runs / "6_multiclass", val_auc=0.60, test_auc=0.85, task="multiclass")
    fake_run(runs / "6b_multiclass", val_auc=0.65, test_auc=0.80, task="multiclass")
    fake_run(runs / "10_long", val_auc=0.94, test_auc=0.93)
    out = tmp_path / "study"
    study.main(study.parse_args(["--runs", str(runs), "--out", str(out)]))

    table = pd.read_csv(out.with_suffix(".csv"))
    chosen = table[table["best_by_validation"]]
    assert set(chosen["stage"]) == {"8_ensemble", "6b_multiclass"}
    ensemble = table[table["stage"] == "8_ensemble"].iloc[0]
    assert ensemble["train_minutes"] == 5.0 and ensemble["arch"] == "mean of stages 2, 3"
    row = "| 8_ensemble (best by val), mean of stages 2, 3 | internal test |"
    assert row in out.with_suffix(".md").read_text()
    assert list(dict.fromkeys(table["stage"])) == ["2_wbce", "3_wbce_aug", "6_multiclass", "6b_multiclass",
                                                   "8_ensemble", "10_long"]


def test_reference_bench_compares_the_compact_model_point_by_point(tmp_path):
    spec = importlib.util.spec_from_file_location("reference_model", ROOT / "bench" / "reference_model.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    labels = [0, 0, 0, 1, 1, 0, 1, 0]
    full = pd.DataFrame({"image_id": [f"i{k}" for k in range(8)], "label": labels,
                         "prob": [0.1, 0.2, 0.35, 0.4, 0.8, 0.45, 0.9, 0.05]})
    full.to_csv(tmp_path / "full.csv", index=False)
    compact = full.assign(prob=full["prob"].where(full["image_id"] != "i3", 0.3))  # one malignant image falls
    compact.iloc[::-1].to_csv(tmp_path / "compact.csv", index=False)  # another order: matched by image_id
    result = bench.faithfulness(tmp_path / "full.csv", tmp_path / "compact.csv", {"recall_bound": 0.38})
    rows = {r["point"]: r for r in result["rows"]}
    assert rows["ROC-AUC"]["difference"] < 0
    assert rows["recall_bound recall (t=0.3800)"]["full"] == 1.0
    assert abs(rows["recall_bound recall (t=0.3800)"]["difference"] + 1 / 3) < 1e-12
    assert rows["recall_bound specificity (t=0.3800)"]["difference"] == 0
    assert abs(result["largest_probability_change"] - 0.1) < 1e-12


def test_run_comparison_pairs_the_runs_on_every_evaluation_they_all_have(tmp_path):
    """bench/hair_study.py (the screens' table): each data set every run was read on, the
    difference from the first run, and recall at each run's own validation threshold."""
    spec = importlib.util.spec_from_file_location("hair_study", ROOT / "bench" / "hair_study.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    noise = {"a": 0.5, "b": 0.2}  # run b separates the classes better
    runs = []
    for name, scale in noise.items():
        run = tmp_path / name
        for relative in ("val_probs.csv", "val_tta/test_probs.csv", "isic2017_trainval/test_probs.csv"):
            probs = np.clip(0.3 + 0.4 * labels + rng.normal(0, scale, len(labels)), 0, 1)
            (run / relative).parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame({"image_id": [f"I{i}" for i in range(len(labels))], "label": labels,
                          "prob": probs}).to_csv(run / relative, index=False)
        (run / "thresholds.json").write_text(json.dumps({"thresholds": {"recall_target": 0.4}}))
        runs.append(run)
    (runs[0] / "ph2").mkdir()  # only one run read PH2: no row for it
    bench.main(bench.parse_args(["--runs", *map(str, runs), "--out", str(tmp_path / "table"), "--bootstrap", "200"]))
    table = pd.read_csv(tmp_path / "table.csv")
    assert table["data"].unique().tolist() == ["validation (HAM10000, lesion-level)",
                                               bench.EXTERNAL["val_tta"], bench.EXTERNAL["isic2017_trainval"]]
    for data, rows in table.groupby("data", sort=False):
        a, b = rows.set_index("run").loc[[str(runs[0]), str(runs[1])]].to_dict("records")
        assert a["roc_auc_minus_first"] == 0 and b["roc_auc_minus_first"] == pytest.approx(b["roc_auc"] - a["roc_auc"])
        assert b["roc_auc_minus_first_lo"] > 0  # clearly better: the paired interval excludes 0
        probs = pd.read_csv(runs[1] / ("val_probs.csv" if data.startswith("validation (HAM10000, lesion")
                                       else {v: k for k, v in bench.EXTERNAL.items()}[data] + "/test_probs.csv"))
        assert b["recall_recall_target"] == pytest.approx((probs["prob"][probs["label"] == 1] >= 0.4).mean())
    for run in runs:  # the test sets make reference-test read: compared only when asked for
        (run / "compact_ph2").mkdir()
        shutil.copy(run / "val_probs.csv", run / "compact_ph2" / "test_probs.csv")
    for flags, expected in (([], 3), (["--test-reads"], 4)):
        bench.main(bench.parse_args(["--runs", *map(str, runs), "--out", str(tmp_path / "table"), "--bootstrap", "50",
                                     *flags]))
        data = pd.read_csv(tmp_path / "table.csv")["data"].unique().tolist()
        assert len(data) == expected and (bench.TEST_READS["compact_ph2"] in data) == bool(flags)
