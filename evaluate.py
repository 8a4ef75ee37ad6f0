"""Step 5: score a trained model on held-out images at the operating points chosen on validation.

Reads <run>/model.pt (for an ensemble of ensemble.py, every member's), <run>/thresholds.json and a
preprocess cache (default: the one the model was trained on), and predicts one split of it
(default test) with the preprocessing the model was trained with. Writes into --out-dir (default
the model folder):
  test_probs.csv         image_id, lesion_id, dx, label, prob (and prob_<dx> for 7-class models),
                         tta (1 where the probabilities are test-time-augmented)
  metrics.csv            one row per operating point: threshold, accuracy, precision, recall,
                         specificity, f1, roc_auc, pr_auc, each with a bootstrap 95% interval
                         (<metric>_lo, <metric>_hi), and the confusion counts
  confusion_matrix.png   counts and row-normalised shares at each operating point
  roc_curve.png, pr_curve.png   with the operating points marked
  calibration.png        reliability diagram: predicted probability against observed frequency
                         (with --clinic NAME the site's recalibrated probability beside it, and
                         test_probs.csv's calibrated_prob; the site's thresholds apply to prob)
  gradcam.png            with --gradcam N: Grad-CAM heat maps of the N most confident true
                         positives, false positives and false negatives (at recall_bound where
                         thresholds.json has it)
  metrics_by_source.csv  where the rows come from several sources: metrics.csv's columns per source
  multiclass_metrics.csv, confusion_matrix_7class.csv/.png   where the model gives the 7 classes (a
                         7-class run, or a model folder with classes.pt): per-class precision,
                         recall and one-vs-rest ROC-AUC, a macro row (balanced accuracy, macro
                         ROC-AUC), each with a 95% interval over lesions; the 7x7 confusion matrix;
                         and metrics.csv's answers_agree: at each operating point, the share of
                         images whose top class is malignant exactly where the decision is
  report.md              the metrics table, the plots and the data they were computed on

Examples: python evaluate.py --run runs/lite0
          python evaluate.py --run runs/lite0 --cache cache/ph2_224 --split all --out-dir runs/lite0/ph2
          python evaluate.py --run runs/ham+isic --source isic2017 --out-dir runs/ham+isic/source_isic2017
"""
import argparse
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from common import (CLASS_MODEL_FILE, DX_CODES, ENGINES, SPLITS, ArgumentParser, ModelFolder, answers_agree,
                    atomic_path, balanced_accuracy_7, binary_metrics, check_preprocessing, class_table_lines, fail,
                    gradcam_maps, group_members, group_resamples, heat_overlay, hidden_metadata, load_cache,
                    lock_output, metadata_features, model_inputs, multiclass_figures, new_figure, number_in,
                    one_line_errors, plot_pr_curve, plot_reliability, ranking_metrics, recalibrated, save_figure,
                    save_image_grid, threshold_metrics, unknown_sites_line, write_csv)

METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--run", type=Path, required=True,
                   help="model folder with model.pt (or members.json) and thresholds.json")
    p.add_argument("--cache", type=Path, help="preprocess cache to predict (default: the training cache)")
    p.add_argument("--split", default="test", choices=[*SPLITS, "all"], help="rows of the cache to predict")
    p.add_argument("--source", metavar="NAME",
                   help="score only this source's rows (a dataset of several: fetch_data.py --from-dir A B)")
    p.add_argument("--out-dir", type=Path, help="where outputs go (default: the model folder)")
    p.add_argument("--bootstrap", type=number_in(int, 0), default=1000,
                   help="resamples for the 95%% intervals (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--clinic", metavar="NAME",
                   help="a site calibration of the run (calibrate.py, <run>/clinics/NAME): its operating points, "
                        "and a calibrated_prob column with the reliability of both probabilities")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction,
                   help="average over flips and right-angle rotations (default: as the thresholds were chosen, "
                        "thresholds.json's tta)")
    p.add_argument("--hide-metadata", action="store_true",
                   help="score the images without their age, sex and site (for a model trained with --metadata): "
                        "as on a test set that has none")
    p.add_argument("--gradcam", type=number_in(int, 0), default=0, metavar="N",
                   help="Grad-CAM grid of N cases per outcome")
    p.add_argument("--classes", action="store_true",
                   help="require the 7-class report: a model without 7 classes ends with one line saying so "
                        "(without the flag such a model is scored for malignancy alone)")
    p.add_argument("--engine", choices=ENGINES,
                   help="onnx: ONNX Runtime (a model folder's ONNX files); torch: PyTorch (default: onnx where the "
                        "folder has them; Grad-CAM always runs on PyTorch)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    return p.parse_args(argv)


def bootstrap_intervals(labels, probs, thresholds, n_resamples, seed):
    """95% percentile intervals of every metric at every threshold, from resampling images.
    Resamples that hold a single class are skipped (no AUC exists for them)."""
    rng = np.random.default_rng(seed)
    samples = {name: [] for name in thresholds}
    for _ in range(n_resamples):
        pick = rng.integers(0, len(labels), len(labels))
        if labels[pick].min() == labels[pick].max():
            continue
        ranking = ranking_metrics(labels[pick], probs[pick])
        for name, t in thresholds.items():
            samples[name].append({**threshold_metrics(labels[pick], probs[pick], t), **ranking})
    intervals = {}
    for name, rows in samples.items():
        table = pd.DataFrame(rows)
        intervals[name] = {m: (table[m].quantile(0.025), table[m].quantile(0.975)) if len(table) else
                           (np.nan, np.nan) for m in METRICS}
    return intervals


def metrics_table(labels, probs, thresholds, n_resamples, seed):
    intervals = bootstrap_intervals(labels, probs, thresholds, n_resamples, seed) if n_resamples else None
    rows = []
    for name, t in thresholds.items():
        m = binary_metrics(labels, probs, t)
        row = {"operating_point": name, "threshold": t, "n": len(labels), "n_malignant": int(labels.sum())}
        for metric in METRICS:
            row[metric] = m[metric]
            if intervals is not None:
                row[f"{metric}_lo"], row[f"{metric}_hi"] = intervals[name][metric]
        row.update({k: m[k] for k in ("tp", "fp", "tn", "fn")})
        rows.append(row)
    return pd.DataFrame(rows)


def metrics_by_source(rows, labels, probs, thresholds, args):
    """The metrics of each source's rows on their own, where the rows come from several sources:
    a model trained on two clinics is judged on each. None for a single source."""
    if "source" not in rows.columns or rows["source"].nunique() < 2:
        return None
    tables = []
    for name in sorted(rows["source"].unique()):
        mine = (rows["source"] == name).to_numpy()
        if labels[mine].min() == labels[mine].max():
            print(f"source {name}: one class only in split '{args.split}', no ROC-AUC; not in metrics_by_source.csv")
            continue
        tables.append(metrics_table(labels[mine], probs[mine], thresholds, args.bootstrap, args.seed)
                      .assign(source=name))
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["source"])
    return table[["source", *[c for c in table.columns if c != "source"]]]


def plot_confusion_matrices(table, path):
    fig, axes = new_figure(ncols=len(table), figsize=(4 * len(table), 3.8))
    axes = np.atleast_1d(axes)
    for ax, row in zip(axes, table.itertuples()):
        counts = np.array([[row.tn, row.fp], [row.fn, row.tp]])
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, f"{counts[i, j]}\n{shares[i, j]:.0%}", ha="center", va="center",
                        color="white" if shares[i, j] > 0.5 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["benign", "malignant"],
               yticklabels=["benign", "malignant"], xlabel="predicted", ylabel="true",
               title=f"{row.operating_point} (t={row.threshold:.3f})")
    save_figure(fig, path)


def plot_roc_curve(labels, probs, table, path):
    from sklearn.metrics import roc_curve
    fpr, tpr, _ = roc_curve(labels, probs)
    fig, ax = new_figure()
    ax.plot(fpr, tpr, label=f"ROC-AUC = {table['roc_auc'].iloc[0]:.3f}")
    for row in table.itertuples():
        ax.plot(1 - row.specificity, row.recall, "o", label=f"{row.operating_point} (t={row.threshold:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="chance")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity (recall)", xlim=(0, 1), ylim=(0, 1.01), title="ROC curve")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def multiclass_intervals(truth, class_probs, lesion_ids, n_resamples, seed):
    """95% percentile intervals of each class's precision, recall and ROC-AUC, of the balanced
    accuracy and of the macro ROC-AUC, from resampling lesions (all of a lesion's images go
    together: HAM10000 holds up to six images of one lesion, and they are no independent cases)."""
    present = np.bincount(truth, minlength=len(DX_CODES)) > 0
    samples = {"precision": [], "recall": [], "roc_auc": [], "balanced_accuracy": [], "macro_roc_auc": []}
    for pick in group_resamples(group_members(lesion_ids), n_resamples, seed):
        figures = multiclass_figures(truth[pick], class_probs[pick])
        for name in ("precision", "recall", "roc_auc"):
            samples[name].append(figures[name])
        # a class a resample misses counts as recall 0 in neither: the mean over the classes it holds
        samples["balanced_accuracy"].append(np.nanmean(figures["recall"][present]))
        samples["macro_roc_auc"].append(np.nanmean(figures["roc_auc"][present]))
    with warnings.catch_warnings():  # a class absent from every resample has no interval: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return {name: np.nanquantile(np.array(values, dtype=float), [0.025, 0.975], axis=0) if values else
                np.full((2, len(DX_CODES)) if name in ("precision", "recall", "roc_auc") else 2, np.nan)
                for name, values in samples.items()}


def multiclass_report(rows, class_probs, out_dir, n_resamples, seed):
    """Per-class precision, recall and one-vs-rest ROC-AUC, a 'macro' row (its recall is the
    balanced accuracy), each with a 95% interval over lesions, and the 7x7 confusion matrix."""
    truth = np.array([DX_CODES.index(dx) for dx in rows["dx"]])
    figures = multiclass_figures(truth, class_probs)
    counts = figures["counts"]
    support = counts.sum(axis=1)
    present = support > 0
    table = pd.DataFrame({"class": DX_CODES, "precision": figures["precision"], "recall": figures["recall"],
                          "roc_auc": figures["roc_auc"], "support": support, "predicted": counts.sum(axis=0)})
    summary = {"balanced_accuracy": balanced_accuracy_7(rows["dx"], class_probs),
               "macro_roc_auc": float(np.nanmean(figures["roc_auc"][present])),
               "balanced_accuracy_lo": np.nan, "balanced_accuracy_hi": np.nan,
               "macro_roc_auc_lo": np.nan, "macro_roc_auc_hi": np.nan}
    macro = {"class": "macro", "precision": float(np.nanmean(figures["precision"][present])),
             "recall": summary["balanced_accuracy"], "roc_auc": summary["macro_roc_auc"],
             "support": int(support.sum()), "predicted": int(support.sum())}
    if n_resamples:
        intervals = multiclass_intervals(truth, class_probs, rows["lesion_id"], n_resamples, seed)
        for name in ("precision", "recall", "roc_auc"):
            table[f"{name}_lo"], table[f"{name}_hi"] = intervals[name]
        summary.update(balanced_accuracy_lo=intervals["balanced_accuracy"][0],
                       balanced_accuracy_hi=intervals["balanced_accuracy"][1],
                       macro_roc_auc_lo=intervals["macro_roc_auc"][0], macro_roc_auc_hi=intervals["macro_roc_auc"][1])
        macro.update(recall_lo=summary["balanced_accuracy_lo"], recall_hi=summary["balanced_accuracy_hi"],
                     roc_auc_lo=summary["macro_roc_auc_lo"], roc_auc_hi=summary["macro_roc_auc_hi"])
    table = pd.concat([table, pd.DataFrame([macro])], ignore_index=True)
    write_csv(table, out_dir / "multiclass_metrics.csv")
    write_csv(pd.DataFrame(counts, index=pd.Index(DX_CODES, name="true"), columns=DX_CODES).reset_index(),
              out_dir / "confusion_matrix_7class.csv")

    shares = counts / np.maximum(support[:, None], 1)
    fig, ax = new_figure(figsize=(6.5, 5.5))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(DX_CODES)):
        for j in range(len(DX_CODES)):
            ax.text(j, i, f"{counts[i, j]}\n{shares[i, j]:.0%}", ha="center", va="center", fontsize=7,
                    color="white" if shares[i, j] > 0.5 else "black")
    ax.set(xticks=range(7), yticks=range(7), xticklabels=DX_CODES, yticklabels=DX_CODES, xlabel="predicted",
           ylabel="true", title=f"7 classes, balanced accuracy {summary['balanced_accuracy']:.3f}")
    save_figure(fig, out_dir / "confusion_matrix_7class.png")
    return summary, table


def plot_gradcam(model, checkpoint, images, test, threshold, n, device, path):
    """Rows: the n most confident true positives, false positives and false negatives."""
    decided = test["prob"].to_numpy() >= threshold
    label = test["label"].to_numpy() == 1
    probs = test["prob"].to_numpy()
    groups = {"true positive": np.flatnonzero(decided & label), "false positive": np.flatnonzero(decided & ~label),
              "false negative": np.flatnonzero(~decided & label)}
    tiles, titles = [], []
    for name, members in groups.items():
        # most confident: highest probability for positives, lowest for false negatives
        members = members[np.argsort(probs[members])]
        chosen = members[::-1][:n] if name != "false negative" else members[:n]
        cams = gradcam_maps(model, images[chosen], checkpoint["normalisation"], device, checkpoint["task"],
                            arch=checkpoint["arch"]) if len(chosen) else []
        for k, cam in zip(chosen, cams):
            tiles.append(heat_overlay(images[k], cam))
            titles.append(f"{name}\n{test['image_id'].iloc[k]} p={probs[k]:.2f}")
        tiles += [None] * (n - len(chosen))  # each outcome keeps a row of its own
        titles += [""] * (n - len(chosen))
    save_image_grid(tiles, titles, path, columns=n, tile_inches=(2.2, 2.4))


def with_interval(summary, name):
    interval = "" if np.isnan(summary[f"{name}_lo"]) else f" [{summary[name + '_lo']:.3f}, {summary[name + '_hi']:.3f}]"
    return f"{summary[name]:.3f}{interval}"


def agreement_line(table):
    shares = ", ".join(f"{row['answers_agree']:.1%} at {row['operating_point']}" for row in table.to_dict("records"))
    return f"The two answers agree (the top class malignant exactly where the decision is) on {shares} of the images."


def multiclass_line(summary):
    return (f"{with_interval(summary, 'balanced_accuracy')}, macro ROC-AUC "
            f"{with_interval(summary, 'macro_roc_auc')}")


def describe_models(models, class_model=None):
    parts = [f"{c['arch']} ({c['task']}, {c['input']} input, {c['input_size']} px, loss {c['loss']})" for _, c in models]
    text = parts[0] if len(parts) == 1 else f"mean probability of {len(parts)} models: " + "; ".join(parts)
    if class_model is not None:
        c = class_model[1]
        text += (f"; the 7 classes from {CLASS_MODEL_FILE}, {c['arch']} ({c['input']} input, {c['input_size']} px, "
                 f"loss {c['loss']})")
    return text


def write_report(out_dir, table, summary, args, models, cache, n_images, plots, by_source=None, class_model=None,
                 class_table=None):
    lines = [f"# Evaluation of {args.run}", "",
             f"- model: {describe_models(models, class_model)}",
             f"- data: {n_images} images of `{cache}`, split `{args.split}`"
             + (f", source `{args.source}`" if args.source else "") + "; thresholds chosen on validation "
             f"(`{args.run / 'thresholds.json'}`)",
             f"- intervals: 95% bootstrap over images ({args.bootstrap} resamples)" + (", test-time augmentation"
                                                                                        if args.tta else "")
             + (", age, sex and site hidden" if args.hide_metadata else ""), "",
             "| operating point | threshold | " + " | ".join(METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for row in table.to_dict("records"):
        cells = [f"{row[m]:.3f} [{row[m + '_lo']:.3f}, {row[m + '_hi']:.3f}]" if m + "_lo" in row else f"{row[m]:.3f}"
                 for m in METRICS]
        lines.append(f"| {row['operating_point']} | {row['threshold']:.4f} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("ROC-AUC and PR-AUC come from the probabilities alone, so they are the same at every operating point.")
    if by_source is not None:
        lines += ["", "Each source on its own (every operating point: `metrics_by_source.csv`):", "",
                  "| source | images | malignant | ROC-AUC |", "|---|---|---|---|"]
        for row in by_source.drop_duplicates("source").to_dict("records"):
            interval = f" [{row['roc_auc_lo']:.3f}, {row['roc_auc_hi']:.3f}]" if "roc_auc_lo" in row else ""
            lines.append(f"| {row['source']} | {row['n']} | {row['n_malignant']} | {row['roc_auc']:.3f}{interval} |")
    if summary:
        lines += ["", f"7 classes: balanced accuracy {multiclass_line(summary)}; intervals: 95% bootstrap over "
                      "lesions (`multiclass_metrics.csv`, and the counts in `confusion_matrix_7class.csv`):", ""]
        lines += class_table_lines(class_table)
        lines += ["", agreement_line(table)]
    lines += [""] + [f"![{name}]({name})" for name in plots]
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


@one_line_errors
def main(args):
    # the small file first: a malformed thresholds.json ends the run before the models' load
    model = ModelFolder(args.run, args.clinic, args.engine, args.device)
    thresholds, calibration = model.points.thresholds, model.points.calibration
    models = model.load().models
    if args.classes:
        model.require_classes()
    if args.gradcam and len(models) > 1:
        fail(args.run, "--gradcam explains a single model, not an ensemble; run it on a member")
    if args.gradcam and model.checkpoint["input"] == "both":
        fail(args.run, "--gradcam explains a model of one view; this one reads two (--input both)")
    if args.tta is None:
        args.tta = model.points.tta
    training_caches = {checkpoint["args"]["cache"] for _, checkpoint in models}
    if args.cache is None and len(training_caches) > 1:
        fail(args.run, f"members were trained on different caches ({', '.join(sorted(training_caches))}); "
             "name one with --cache")
    cache = args.cache or Path(training_caches.pop())
    check_preprocessing(cache, models)  # classes.pt reads images as model.pt does (load_class_model)
    lock_output(args.out_dir or args.run)
    index, arrays = load_cache(cache)
    rows = index if args.split == "all" else index[index["split"] == args.split]
    if args.source:
        sources = sorted(index["source"].dropna().unique()) if "source" in index.columns else []
        if args.source not in sources:
            fail(cache / "index.csv", f"has no source '{args.source}' (its sources: {', '.join(sources) or 'none'})")
        rows = rows[rows["source"] == args.source]
    validated = {tuple(checkpoint["args"].get("val_source") or ()) for _, checkpoint in models}
    if args.split == "val" and args.cache is None and args.source is None and len(validated) == 1 and all(validated):
        # the val rows that chose the epoch (train.py --val-source): thresholds chosen on these
        # probabilities (make threshold with TTA) then come from the same images as without TTA
        val_sources = validated.pop()
        rows = rows[rows["source"].isin(val_sources)]
        print(f"split val: the rows of source {', '.join(val_sources)} alone, which chose the epoch (--val-source)")
    if rows.empty:
        fail(cache / "index.csv", f"has no rows in split '{args.split}'" + (f" of source '{args.source}'"
                                                                            if args.source else ""))

    known = hidden_metadata(rows) if args.hide_metadata else rows
    unknown_line = unknown_sites_line(known, model.general_sites)  # train.py --general-sites: read as it trained
    if unknown_line and model.reads_metadata:
        print(unknown_line)
    probs, class_probs = model.probs(arrays, rows["row"], metadata_features(known, model.general_sites), args.tta)
    labels = rows["malignant"].to_numpy()
    out_dir = args.out_dir or args.run
    test = rows[["image_id", "lesion_id", "dx"]].copy()
    test["label"], test["prob"] = labels, probs
    test["tta"] = int(args.tta)
    if calibration is not None:  # the site's thresholds apply to the model's probability, prob
        test["calibrated_prob"] = recalibrated(probs, calibration)
    if class_probs is not None:
        for k, code in enumerate(DX_CODES):
            test[f"prob_{code}"] = class_probs[:, k]
    write_csv(test, out_dir / "test_probs.csv")
    if labels.min() == labels.max():
        fail(cache / "index.csv", f"split '{args.split}' holds one class only; probabilities written, "
             "but no ROC-AUC or interval exists")

    table = metrics_table(labels, probs, thresholds, args.bootstrap, args.seed)
    if class_probs is not None:  # the two answers of a model that gives both, at each operating point
        table["answers_agree"] = [float(np.mean(answers_agree(probs, class_probs, t))) for t in table["threshold"]]
    write_csv(table, out_dir / "metrics.csv")
    by_source = metrics_by_source(rows, labels, probs, thresholds, args)
    if by_source is not None:
        write_csv(by_source, out_dir / "metrics_by_source.csv")
    plots = ["confusion_matrix.png", "roc_curve.png", "pr_curve.png", "calibration.png"]
    plot_confusion_matrices(table, out_dir / "confusion_matrix.png")
    plot_roc_curve(labels, probs, table, out_dir / "roc_curve.png")
    plot_pr_curve(labels, probs, thresholds, out_dir / "pr_curve.png", f"{args.split} precision-recall")
    plot_reliability(labels, probs, out_dir / "calibration.png",
                     None if calibration is None else test["calibrated_prob"].to_numpy())
    summary = class_table = None
    if class_probs is not None:
        summary, class_table = multiclass_report(rows, class_probs, out_dir, args.bootstrap, args.seed)
        plots.append("confusion_matrix_7class.png")
    if args.gradcam:  # a gradient: PyTorch's network, whichever engine scored the images
        network, checkpoint = model.explained_network()
        images = model_inputs(arrays, rows["row"], checkpoint["input"], checkpoint["input_size"])
        plot_gradcam(network, checkpoint, images, test, model.points.threshold()[1], args.gradcam,
                     next(network.parameters()).device, out_dir / "gradcam.png")
        plots.append("gradcam.png")
    write_report(out_dir, table, summary, args, models, cache, len(rows), plots, by_source, model.class_model,
                 class_table)
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 160):
        print(table[["operating_point", "threshold", *METRICS]].to_string(index=False))
        if by_source is not None:
            print("per source:")
            print(by_source[["source", "operating_point", "threshold", "n", *METRICS]].to_string(index=False))
    if summary:
        print(f"7 classes: balanced accuracy {multiclass_line(summary)}")
        print("\n".join(class_table_lines(class_table)))
        print(agreement_line(table))
    print(f"wrote {out_dir / 'metrics.csv'}, {out_dir / 'report.md'} and plots "
          f"({len(rows)} images of {cache}, split {args.split})")


if __name__ == "__main__":
    main(parse_args())
