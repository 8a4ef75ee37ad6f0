"""Score arms of a study on the outside panel of docs/third_edition.md, each arm at several seeds,
paired against the first arm (the baseline) seed by seed, and apply the protocol's rule.

Sites (each scored on its own; caches named by --cache-pattern, built by make third-data):
  ham10000_val   ham10000_full's val split, metadata as it comes (a guard: not in the panel mean)
  isic2017       ISIC 2017 train+val, age and sex hidden (panel) and shown
  ph2            PH2 (no metadata)
  isic2020_dev   isic2020_dev, age, sex and site shown (panel) and hidden
A run never scores an image it trained on: a site's rows in the train split of the run's training
cache are left out (ISIC 2017 train for an arm that trains on it), and arms are compared on the
images all of them scored.

For each run and reading: ROC-AUC and the specificity at the site's own 90%-recall point. For each
arm beside the baseline: the difference of the seeds' mean, its 95% interval (bootstrap over the
site's groups, the same resamples for every seed and arm: patients where the site has patient_id,
else lesions), each seed's own difference, and the rule's verdict (--rule screen or keep).
Probabilities are kept in runs/panel/<run>/<site>_<reading>.csv (--keep) and reused while model.pt
is older.
Writes --out.csv (every figure) and --out.md (the tables and verdicts).

Example: python bench/panel.py --arm B=runs/third/B_s0,runs/third/B_s1 --arm L3a=runs/third/L3a_s0,runs/third/L3a_s1
             --rule screen --out bench/results/third/screen
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import (CLASS_COLUMNS, DX_CODES, ModelFolder, check_preprocessing, chosen_class_biases,  # noqa: E402
                    ensemble_probs, fail, group_members, hidden_metadata, load_cache, load_folder_models,
                    metadata_features, one_line_errors, paired_differences, pick_device, preprocess_settings,
                    ranking_metrics, read_csv, read_json, top_class_balanced_accuracy, write_csv, write_json,
                    write_table_and_markdown)

# (site, dataset, split, readings; the first reading is the panel's)
SITES = (("ham10000_val", "hamfull_trainval", "val", ("shown",)),
         ("isic2017", "isic2017_trainval", "all", ("hidden", "shown")),
         ("ph2", "ph2", "all", ("none",)),
         ("isic2020_dev", "isic2020_dev", "all", ("shown", "hidden")))
GUARD = "ham10000_val"
OUTSIDE = [site for site, *_ in SITES if site != GUARD]
# the protocol's rules: (least panel gain, largest drop at an outside site, largest drop on HAM10000 val)
RULES = {"keep": (0.010, 0.020, 0.010), "screen": (0.005, 0.030, 0.020)}
RECALL_POINT = 0.90


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", action="append", required=True, metavar="NAME=RUN,RUN",
                   help="an arm and its runs, one per seed in the same seed order for every arm; the first is the "
                        "baseline. RUN+RUN: those runs' ensemble (the mean probability) in one seed's place")
    p.add_argument("--general-sites", nargs="*", default=[], metavar="ARM",
                   help="arms that read the ISIC Archive's general site words as the HAM10000 sites they cover "
                        "(lever L6); the others read them as site unknown")
    p.add_argument("--keep", type=Path, default=Path("runs/panel"),
                   help="where each run's probabilities are kept, a folder per run")
    p.add_argument("--rule", choices=sorted(set(RULES) | set(FOUR_RULES)), default="screen",
                   help="screen or keep (the protocols' rules); ship: with --four, the fourth edition's \"What "
                        "ships\" against the model a recipe would replace")
    p.add_argument("--adjust", action="append", default=[], metavar="ARM=la|pb",
                   help="with --four, an inference-only arm: its runs' class probabilities adjusted by the training "
                        "class prior (la) or by per-class biases chosen on HAM10000 val (pb)")
    p.add_argument("--four", action="store_true",
                   help="the fourth edition's panel (docs/fourth_edition.md): ROC-AUC and balanced accuracy at every "
                        "site, BCN20000 val as a second guard, and its rule")
    p.add_argument("--tta", nargs="*", default=[], metavar="ARM",
                   help="with --four, arms whose runs are read with test-time augmentation (the 8 flips and "
                        "rotations); the same runs under another arm name read without it")
    p.add_argument("--record", type=Path, metavar="DIR",
                   help="with --four, record each trained run that has its weights as DIR/<run's name>/: its "
                        "config.json and its probabilities at every site, no weights, no labels; a run whose "
                        "weights are not here is read from there (its labels from the sites' caches). An --arm "
                        "may also name such a folder itself")
    p.add_argument("--cache-pattern", default="cache/{data}_224_third_{crop_fit}",
                   help="a site's cache, from its dataset and the run's crop fit")
    p.add_argument("--out", type=Path, required=True, help="output path without suffix (.csv and .md)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    return p.parse_args(argv)


def parse_arms(specs):
    arms = {}
    for spec in specs:
        name, _, runs = spec.partition("=")
        if not name or not runs:
            fail(f"--arm {spec}", "expects NAME=RUN[,RUN...]")
        arms[name] = [Path(run) for run in runs.split(",")]
    seeds = {len(runs) for runs in arms.values()}
    if len(seeds) > 1:
        fail("--arm", "every arm needs the same number of runs (one per seed)")
    return arms


def specificity_at_recall(labels, probs, recall=RECALL_POINT):
    """The best specificity among thresholds whose recall on these images is at least `recall`."""
    from sklearn.metrics import roc_curve
    fpr, tpr, _ = roc_curve(labels, probs)
    return float(1 - fpr[tpr >= recall].min())


def reading_name(reading, general_sites):
    return f"{reading}_general" if general_sites and reading == "shown" else reading


def training_cache(run):
    """A run's training cache: config.json's, or for a model folder without one (the shipped one), model.pt's."""
    config = run / "config.json"
    if config.is_file():
        return Path(read_json(config)["args"]["cache"])
    import torch
    return Path(torch.load(run / "model.pt", map_location="cpu", weights_only=True)["args"]["cache"])


def training_images(run):
    """The image ids a run trained on, from its training cache (training_cache). A model folder
    whose cache is not on this machine (the shipped one) leaves out nothing, and says so: its card
    names what it trained on."""
    cache = training_cache(run)
    if not (cache / "index.csv").is_file():
        print(f"{run}: its training cache {cache} is not here; no site image is left out as a training image")
        return set()
    training = read_csv(cache / "index.csv", ("image_id", "split"))
    return set(training.loc[training["split"] == "train", "image_id"])


def score_run(run, cache_pattern, general_sites, keep, device):
    """{(site, reading): DataFrame(image_id, group, label, prob)} of one run, from its kept files
    (keep/<the run's path, / as __>/) where they are newer than its model."""
    model_file = run / "model.pt"
    if not model_file.is_file():
        fail(model_file, "missing: train the run first")
    out = {}
    models = None
    trained_on = training_images(run)
    for site, data, split, readings in SITES:
        folder = keep / str(run).strip("/").replace("/", "__")
        kept = {reading: folder / f"{site}_{reading_name(reading, general_sites)}.csv" for reading in readings}
        if all(path.is_file() and path.stat().st_mtime > model_file.stat().st_mtime for path in kept.values()):
            out.update({(site, reading): read_csv(path) for reading, path in kept.items()})
            continue
        if models is None:
            models = load_folder_models(run, device)
            crop_fit = preprocess_settings(models[0][1]["preprocess"])["crop_fit"]
        cache = Path(cache_pattern.format(data=data, crop_fit=crop_fit))
        check_preprocessing(cache, models)
        index, arrays = load_cache(cache)
        rows = index if split == "all" else index[index["split"] == split]
        rows = rows[~rows["image_id"].isin(trained_on)]
        metadata = {reading: metadata_features(hidden_metadata(rows) if reading in ("hidden", "none") else rows,
                                               general_sites=general_sites) for reading in readings}
        group = rows["patient_id"] if "patient_id" in rows else rows["lesion_id"]
        for reading, probs in readings_probs(models, arrays, rows["row"], device, metadata).items():
            table = pd.DataFrame({"image_id": rows["image_id"].to_numpy(), "group": group.astype(str).to_numpy(),
                                  "label": rows["malignant"].to_numpy(), "prob": probs})
            write_csv(table, kept[reading])
            out[site, reading] = table
    return out


def ensemble_scores(results):
    """Several runs' score_run results as one ensemble's: the mean probability, image by image, as
    ensemble.py's ensembles give it, on the images every member scored."""
    if len(results) == 1:
        return results[0]
    out = {}
    for key, first in results[0].items():
        tables = [result[key].set_index("image_id") for result in results]
        scored = first["image_id"][first["image_id"].isin(set.intersection(*(set(t.index) for t in tables)))]
        table = tables[0].loc[scored].copy()
        table["prob"] = np.mean([t.loc[scored, "prob"].to_numpy() for t in tables], axis=0)
        out[key] = table.reset_index()
    return out


def readings_probs(models, arrays, rows, device, metadata):
    """{reading: malignancy probabilities} for each reading's metadata, the mean over the models.
    The image network runs once per model: a metadata model's head then reads its features with
    each reading's metadata (what ensemble_probs gives reading by reading, at a fraction of the
    time); a model without metadata gives every reading the same probabilities."""
    import torch
    from common import inference_batch_size, model_inputs, output_probs, to_model_tensor
    probs = {reading: [] for reading in metadata}
    for model, checkpoint in models:
        if not checkpoint.get("metadata"):
            p, _ = ensemble_probs([(model, checkpoint)], arrays, rows, device)
            for reading in metadata:
                probs[reading].append(p)
            continue
        if checkpoint["input"] == "both" or not hasattr(model, "backbone"):  # no shared pass: reading by reading
            for reading, values in metadata.items():
                p, _ = ensemble_probs([(model, checkpoint)], arrays, rows, device, metadata=values)
                probs[reading].append(p)
            continue
        images = model_inputs(arrays, rows, checkpoint["input"], checkpoint["input_size"])
        batch = inference_batch_size(images, device)
        features = []
        with torch.inference_mode():
            for start in range(0, len(images), batch):
                x = to_model_tensor(images[start:start + batch], checkpoint["normalisation"]).to(device)
                features.append(model.backbone(x.contiguous(memory_format=torch.channels_last)).float())
            features = torch.cat(features)
            for reading, values in metadata.items():
                extra = model.metadata(torch.as_tensor(values).to(device))
                p, _ = output_probs(model.head(torch.cat([features, extra], dim=1)), checkpoint["task"])
                probs[reading].append(p.cpu().numpy())
    return {reading: np.mean(values, axis=0) for reading, values in probs.items()}


def site_scores(labels, probs):
    return ranking_metrics(labels, probs)["roc_auc"], specificity_at_recall(labels, probs)


def compare_site(tables, arms, n_resamples, seed):
    """Rows of one site reading: each run's ROC-AUC and specificity at 90% recall, and each arm's
    seed-mean difference from the baseline with its paired bootstrap interval."""
    common_ids = sorted(set.intersection(*(set(t["image_id"]) for t in tables.values())))
    first = next(iter(tables.values())).set_index("image_id").loc[common_ids]
    labels, groups = first["label"].to_numpy(), first["group"].to_numpy()
    probs = {key: t.set_index("image_id").loc[common_ids, "prob"].to_numpy() for key, t in tables.items()}
    names = list(arms)
    n_seeds = len(arms[names[0]])
    members = group_members(groups)

    def roc_auc(name, s, pick):
        pick = slice(None) if pick is None else pick
        return ranking_metrics(labels[pick], probs[name, s][pick])["roc_auc"] \
            if labels[pick].min() != labels[pick].max() else np.nan

    compared = paired_differences(roc_auc, arms, n_seeds, members, n_resamples, seed)
    rows = []
    for name in names:
        seeds, differences, (low, high) = compared[name]
        seed_auc, seed_diff = [float(v) for v in seeds[:, 0]], [float(v) for v in differences[:, 0]]
        low, high = low[0], high[0]
        rows.append({"arm": name, "images": len(labels), "malignant": int(labels.sum()),
                     "groups": len(members), "roc_auc": float(np.mean(seed_auc)),
                     **{f"roc_auc_seed{s}": v for s, v in enumerate(seed_auc)},
                     "specificity_at_recall90": float(np.mean([specificity_at_recall(labels, probs[name, s])
                                                                for s in range(n_seeds)])),
                     "difference": float(np.mean(seed_diff)), "difference_lo": low, "difference_hi": high,
                     **{f"difference_seed{s}": v for s, v in enumerate(seed_diff)}})
    return rows


def verdicts(table, arms, rule):
    """Per arm beside the baseline: panel difference, worst outside site, HAM10000 val, passed."""
    least_gain, outside_drop, guard_drop = RULES[rule]
    panel = table[table["in_panel"]]
    out = []
    for name in list(arms)[1:]:
        mine = panel[panel["arm"] == name].set_index("site")
        panel_gain = float(mine.loc[OUTSIDE, "difference"].mean())
        seed_gains = [float(mine.loc[OUTSIDE, f"difference_seed{s}"].mean()) for s in range(len(arms[name]))]
        worst_site = mine.loc[OUTSIDE, "difference"].idxmin()
        worst = float(mine.loc[worst_site, "difference"])
        guard = float(mine.loc[GUARD, "difference"])
        passed = panel_gain >= least_gain and worst >= -outside_drop and guard >= -guard_drop
        out.append({"arm": name, "panel": float(mine.loc[OUTSIDE, "roc_auc"].mean()), "panel_difference": panel_gain,
                    **{f"panel_difference_seed{s}": v for s, v in enumerate(seed_gains)},
                    "worst_site": worst_site, "worst_site_difference": worst, "ham10000_val_difference": guard,
                    "passes": passed})
    return pd.DataFrame(out)


def markdown(table, verdict, arms, rule):
    least_gain, outside_drop, guard_drop = RULES[rule]
    n_seeds = len(next(iter(arms.values())))
    baseline = list(arms)[0]
    lines = [f"Baseline: `{baseline}` ({', '.join(str(r) for r in arms[baseline])}). ROC-AUC is the mean of "
             f"{n_seeds} seeds (each seed in brackets); differences are paired seed by seed, with 95% bootstrap "
             "intervals over the site's patients or lesions; spec@90 is the specificity at the site's own 90% "
             "recall point.", "",
             "| site, reading | images (malignant) | arm | ROC-AUC (seeds) | spec@90 | difference (seeds) |",
             "|---|---|---|---|---|---|"]
    for row in table.to_dict("records"):
        seeds = ", ".join(f"{row[f'roc_auc_seed{s}']:.3f}" for s in range(n_seeds))
        seed_diffs = ", ".join(f"{row[f'difference_seed{s}']:+.3f}" for s in range(n_seeds))
        difference = "baseline" if row["arm"] == baseline else \
            f"{row['difference']:+.3f} ({row['difference_lo']:+.3f} to {row['difference_hi']:+.3f}) [{seed_diffs}]"
        panel = " (panel)" if row["in_panel"] else ""
        lines.append(f"| {row['site']}, {row['reading']}{panel} | {row['images']} ({row['malignant']}) | "
                     f"{row['arm']} | {row['roc_auc']:.3f} [{seeds}] | {row['specificity_at_recall90']:.3f} | "
                     f"{difference} |")
    lines += ["", f"Rule ({rule}): panel +{least_gain:.3f} or more, no outside site below -{outside_drop:.3f}, "
              f"HAM10000 val not below -{guard_drop:.3f}.", "",
              "| arm | panel ROC-AUC | panel difference (seeds) | worst outside site | HAM10000 val | verdict |",
              "|---|---|---|---|---|---|"]
    base_panel = table[(table["arm"] == baseline) & table["in_panel"] & table["site"].isin(OUTSIDE)]["roc_auc"].mean()
    lines.append(f"| {baseline} | {base_panel:.3f} | baseline | | | |")
    for row in verdict.to_dict("records"):
        seeds = ", ".join(f"{row[f'panel_difference_seed{s}']:+.3f}" for s in range(n_seeds))
        lines.append(f"| {row['arm']} | {row['panel']:.3f} | {row['panel_difference']:+.3f} [{seeds}] | "
                     f"{row['worst_site']} {row['worst_site_difference']:+.3f} | "
                     f"{row['ham10000_val_difference']:+.3f} | "
                     f"{'passes' if row['passes'] else 'fails'} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# the fourth edition (docs/fourth_edition.md): both answers at every site, BCN20000 val a second guard

# (site, dataset, split, source, readings; the first reading is the panel's)
FOUR_SITES = (("ham10000_val", "hamfull_trainval", "val", None, ("shown",)),
              ("bcn20000_val", "three_trainval", "val", "bcn20000_84", ("shown",)),
              ("isic2017", "isic2017_trainval", "all", None, ("hidden", "shown")),
              ("ph2", "ph2", "all", None, ("none",)),
              ("isic2020_dev", "isic2020_dev", "all", None, ("shown", "hidden")))
FOUR_GUARDS = ("ham10000_val", "bcn20000_val")
# the protocol's rules: the least panel gain (ROC-AUC, balanced accuracy), the largest panel fall
# allowed beside it (none in a screen), the largest fall at an outside site and on a guard
FOUR_RULES = {"keep": {"gain": (0.010, 0.020), "panel_fall": (0.005, 0.010), "site_fall": (0.020, 0.040),
                       "guard_fall": (0.010, 0.020)},
              "screen": {"gain": (0.005, 0.010), "panel_fall": None, "site_fall": (0.030, 0.060),
                         "guard_fall": (0.020, 0.040)},
              # "What ships" (docs/fourth_edition.md): against the model it would replace, a higher panel
              # balanced accuracy, and the ranking kept by the keep rule's falls (None: no limit)
              "ship": {"gain": (None, 0.0), "panel_fall": (0.005, None), "site_fall": (0.020, None),
                       "guard_fall": (0.010, None)}}
FOUR_METRICS = ("roc_auc", "bal_acc")
MIN_CLASS_IMAGES = 10  # a class enters a site's balanced accuracy from this many images on


def site_classes(dx):
    """The classes a site holds with at least MIN_CLASS_IMAGES images, in DX_CODES order."""
    counts = pd.Series(dx).value_counts()
    return [code for code in DX_CODES if counts.get(code, 0) >= MIN_CLASS_IMAGES]


def trains_on(run, source):
    """Whether a run's training cache has training rows of `source`."""
    cache = training_cache(run)
    index = read_csv(cache / "index.csv", ("split",))
    return "source" in index and bool(((index["split"] == "train") & (index["source"] == source)).any())


def site_rows(index, split, source, trained_on):
    """A site's rows of its cache: the split, the source, none a run trained on."""
    rows = index if split == "all" else index[index["split"] == split]
    if source is not None:
        rows = rows[rows["source"] == source]
    return rows[~rows["image_id"].isin(trained_on)]


def site_frame(rows):
    """What a site's table holds of each image beside the run's probabilities: its resampling group
    (patient where the site has one, else lesion), malignancy label and class."""
    group = rows["patient_id"] if "patient_id" in rows else rows["lesion_id"]
    return pd.DataFrame({"image_id": rows["image_id"].to_numpy(), "group": group.astype(str).to_numpy(),
                         "label": rows["malignant"].to_numpy(), "dx": rows["dx"].to_numpy()})


def score_run_four(run, cache_pattern, keep, device, tta=False):
    """{(site, reading): DataFrame(image_id, group, label, dx, prob, prob_<dx>...)} of one run on
    the fourth edition's sites, kept as score_run keeps its files (a _four suffix; _tta_four read
    with test-time augmentation). A model trained with --general-sites reads the site words as it
    trained. A recorded run (--record's folder: no weights) gives the probabilities it holds."""
    model_file = run / "model.pt"
    if not model_file.is_file():
        return recorded_scores(run, cache_pattern, tta)
    out, model = {}, None
    trained_on = training_images(run)
    folder = keep / str(run).strip("/").replace("/", "__")
    suffix = "_tta" if tta else ""
    for site, data, split, source, readings in FOUR_SITES:
        kept = {reading: folder / f"{site}_{reading}{suffix}_four.csv" for reading in readings}
        if all(path.is_file() and path.stat().st_mtime > model_file.stat().st_mtime for path in kept.values()):
            out.update({(site, reading): read_csv(path) for reading, path in kept.items()})
            continue
        if model is None:
            model = ModelFolder(run, device=device).load()
            crop_fit = preprocess_settings(model.checkpoint["preprocess"])["crop_fit"]
        cache = Path(cache_pattern.format(data=data, crop_fit=crop_fit))
        check_preprocessing(cache, model.models)
        index, arrays = load_cache(cache)
        rows = site_rows(index, split, source, trained_on)
        for reading in readings:
            known = hidden_metadata(rows) if reading in ("hidden", "none") else rows
            probs, class_probs = model.probs(arrays, rows["row"], metadata_features(known, model.general_sites), tta)
            table = site_frame(rows).assign(prob=probs)
            if class_probs is not None:
                for k, column in enumerate(CLASS_COLUMNS):
                    table[column] = class_probs[:, k]
            write_csv(table, kept[reading])
            out[site, reading] = table
    return out


# A recorded run: a run's config.json and its probabilities at every site, without its weights and
# without the sites' labels (those come from the sites' caches again), so that a run trained on one
# machine pairs with one trained on another (docs/fourth_edition.md, the full length's plan).
RECORDED_COLUMNS = ["image_id", "prob", *CLASS_COLUMNS]


def recorded_file(folder, site, reading, tta):
    return folder / f"{site}_{reading}{'_tta' if tta else ''}.csv"


def record_run(run, scores, into, tta):
    """Write a run's config.json and its site probabilities (float32, written exactly) to into/<run's name>/."""
    folder = into / run.name
    folder.mkdir(parents=True, exist_ok=True)
    write_json(read_json(run / "config.json"), folder / "config.json")
    for (site, reading), table in scores.items():
        table = table[[c for c in RECORDED_COLUMNS if c in table]]
        numbers = table.columns.drop("image_id")  # the network's float32, whether fresh or read from a kept file
        table = table.assign(**{c: table[c].astype(np.float32) for c in numbers})
        write_csv(table, recorded_file(folder, site, reading, tta), float_format="%.9g")


def recorded_scores(run, cache_pattern, tta):
    """score_run_four's tables of a recorded run, each image's group, label and class read again
    from the site's cache; the images must be those the run was read on."""
    config = run / "config.json"
    if not config.is_file():
        fail(run, "is neither a trained run (model.pt) nor a recorded one (config.json and its probabilities, "
             "bench/panel.py --record)")
    crop_fit = preprocess_settings(read_json(config)["cache_key"])["crop_fit"]
    trained_on = training_images(run)
    out = {}
    for site, data, split, source, readings in FOUR_SITES:
        cache = Path(cache_pattern.format(data=data, crop_fit=crop_fit))
        rows = site_rows(read_csv(cache / "index.csv"), split, source, trained_on)
        for reading in readings:
            path = recorded_file(run, site, reading, tta)
            if not path.is_file():
                reading_words = " (test-time augmentation)" if tta else ""
                fail(path, f"missing: the run was not recorded with this reading{reading_words}")
            probs = read_csv(path, ("image_id", "prob"))
            numbers = probs.columns.drop("image_id")  # written exactly as float32: read back to the same values
            probs[numbers] = probs[numbers].astype(np.float32).astype(np.float64)
            if sorted(probs["image_id"]) != sorted(rows["image_id"]):
                fail(path, f"holds other images than {cache}'s {site} rows: the run was recorded on another cache")
            out[site, reading] = site_frame(rows).merge(probs, on="image_id", how="left")
    return out


# inference-only arms (docs/fourth_edition.md): a run's class probabilities reweighted, malignancy unchanged
ADJUSTMENTS = ("la", "pb")
def reweighted(table, weights):
    """The table with each class probability times its weight, renormalised: class logits plus
    log(weights), malignancy unchanged."""
    probs = table[CLASS_COLUMNS].to_numpy() * np.asarray(weights)[None, :]
    return table.assign(**dict(zip(CLASS_COLUMNS, (probs / probs.sum(axis=1, keepdims=True)).T)))


def training_class_prior(run):
    """The frequency of each class among a run's training images (its training cache's train rows)."""
    cache = training_cache(run)
    dx = read_csv(cache / "index.csv", ("split", "dx")).query("split == 'train'")["dx"]
    counts = dx.value_counts().reindex(DX_CODES, fill_value=0).to_numpy(dtype=float)
    return np.maximum(counts, 1) / counts.sum()


def adjusted_scores(scores, run, adjustment):
    """A run's scores with its class probabilities adjusted: la, logit adjustment (minus the log of
    the training class prior, tau = 1); pb, per-class biases chosen on its HAM10000 val table."""
    if adjustment == "la":
        weights = 1 / training_class_prior(run)
    else:
        val = scores["ham10000_val", "shown"]
        weights = np.exp(chosen_class_biases(val["dx"].to_numpy(), val[CLASS_COLUMNS].to_numpy()))
    return {key: reweighted(table, weights) for key, table in scores.items()}


def four_figures(table, ids, classes, pick=None):
    """(ROC-AUC, balanced accuracy or NaN) of one run's table on the images `ids` (a resample: pick)."""
    t = table.loc[ids] if pick is None else table.loc[ids].iloc[pick]
    labels = t["label"].to_numpy()
    auc = ranking_metrics(labels, t["prob"].to_numpy())["roc_auc"] if labels.min() != labels.max() else np.nan
    bal = top_class_balanced_accuracy(t["dx"].to_numpy(), t[CLASS_COLUMNS].to_numpy(), classes) \
        if CLASS_COLUMNS[0] in t and classes else np.nan
    return auc, bal


def compare_site_four(tables, arms, n_resamples, seed):
    """Rows of one site reading: each arm's ROC-AUC and balanced accuracy (seed means, each seed),
    and its paired seed-mean differences from the baseline with bootstrap intervals over groups."""
    common_ids = sorted(set.intersection(*(set(t["image_id"]) for t in tables.values())))
    tables = {key: t.set_index("image_id") for key, t in tables.items()}
    first = next(iter(tables.values())).loc[common_ids]
    classes = site_classes(first["dx"].to_numpy())
    names, n_seeds = list(arms), len(next(iter(arms.values())))
    members = group_members(first["group"].to_numpy())
    compared = paired_differences(lambda name, s, pick: four_figures(tables[name, s], common_ids, classes, pick),
                                  arms, n_seeds, members, n_resamples, seed)
    rows = []
    for name in names:
        row = {"arm": name, "images": len(common_ids), "malignant": int(first["label"].sum()),
               "classes": " ".join(classes)}
        seeds, differences, (lows, highs) = compared[name]
        for m, metric in enumerate(FOUR_METRICS):
            seed_values, seed_diffs = [float(v) for v in seeds[:, m]], [float(v) for v in differences[:, m]]
            low, high = lows[m], highs[m]
            row.update({metric: float(np.mean(seed_values)),
                        **{f"{metric}_seed{s}": v for s, v in enumerate(seed_values)},
                        f"{metric}_difference": float(np.mean(seed_diffs)), f"{metric}_difference_lo": low,
                        f"{metric}_difference_hi": high,
                        **{f"{metric}_difference_seed{s}": v for s, v in enumerate(seed_diffs)}})
        rows.append(row)
    return rows


def verdicts_four(table, arms, rule, bcn_guard):
    """Per arm beside the baseline: both panel differences, the worst outside site of each, the
    guards (BCN20000 val only where bcn_guard[arm]: both train on it), and the rule's verdict."""
    limits = FOUR_RULES[rule]
    panel = table[table["in_panel"]]
    out = []
    for name in list(arms)[1:]:
        mine = panel[panel["arm"] == name].set_index("site")
        row = {"arm": name}
        gains, falls_ok, sites_ok = [], True, True
        for m, metric in enumerate(FOUR_METRICS):
            gain = float(mine.loc[OUTSIDE, f"{metric}_difference"].mean())
            worst_site = mine.loc[OUTSIDE, f"{metric}_difference"].idxmin()
            worst = float(mine.loc[worst_site, f"{metric}_difference"])
            row.update({f"panel_{metric}": float(mine.loc[OUTSIDE, metric].mean()),
                        f"panel_{metric}_difference": gain,
                        **{f"panel_{metric}_difference_seed{s}": float(mine.loc[OUTSIDE, f"{metric}_difference_seed{s}"]
                                                                      .mean()) for s in range(len(arms[name]))},
                        f"worst_site_{metric}": worst_site, f"worst_site_{metric}_difference": worst})
            least = limits["gain"][m]
            gains.append(least is not None and gain >= least and gain > 0)
            if limits["panel_fall"] is not None and limits["panel_fall"][m] is not None:
                falls_ok &= gain >= -limits["panel_fall"][m]
            if limits["site_fall"][m] is not None:
                sites_ok &= worst >= -limits["site_fall"][m]
        guards_ok = True
        for guard in FOUR_GUARDS:
            if guard == "bcn20000_val" and not bcn_guard[name]:
                continue
            for m, metric in enumerate(FOUR_METRICS):
                difference = float(mine.loc[guard, f"{metric}_difference"])
                row[f"{guard}_{metric}_difference"] = difference
                if limits["guard_fall"][m] is not None:
                    guards_ok &= not difference < -limits["guard_fall"][m]
        row["passes"] = bool(any(gains) and falls_ok and sites_ok and guards_ok)
        out.append(row)
    return pd.DataFrame(out)


def rule_words(limits):
    """A FOUR_RULES entry in words."""
    def fall(value):
        return "no limit" if value is None else f"-{value:.3f}"
    gain = " or ".join(f"{name} {'higher' if v == 0 else f'+{v:.3f}'}" for name, v in
                       zip(("panel ROC-AUC", "balanced accuracy"), limits["gain"]) if v is not None)
    panel_fall, (site_roc, site_bal), guard_fall = limits["panel_fall"], limits["site_fall"], limits["guard_fall"]
    return (gain + (f", neither panel figure below {fall(panel_fall[0])} / {fall(panel_fall[1])}" if panel_fall else "")
            + f"; no outside site below {fall(site_roc)} (ROC-AUC) / {fall(site_bal)} (balanced accuracy); guards not "
            f"below {fall(guard_fall[0])} / {fall(guard_fall[1])}")


def markdown_four(table, verdict, arms, rule):
    n_seeds = len(next(iter(arms.values())))
    baseline = list(arms)[0]
    limits = FOUR_RULES[rule]
    lines = [f"Baseline: `{baseline}` ({', '.join(str(r) for r in arms[baseline])}). Each figure is the mean of "
             f"{n_seeds} seeds (each seed in brackets); differences are paired seed by seed, with 95% bootstrap "
             "intervals over the site's patients, lesions or images. Balanced accuracy: the top class's mean recall "
             f"over the classes the site holds with {MIN_CLASS_IMAGES} images or more.", "",
             "| site, reading | images (malignant) | classes | arm | ROC-AUC (seeds) | difference (seeds) | "
             "balanced accuracy (seeds) | difference (seeds) |", "|---|---|---|---|---|---|---|---|"]
    for row in table.to_dict("records"):
        cells = []
        for metric in FOUR_METRICS:
            seeds = ", ".join(f"{row[f'{metric}_seed{s}']:.3f}" for s in range(n_seeds))
            diffs = ", ".join(f"{row[f'{metric}_difference_seed{s}']:+.3f}" for s in range(n_seeds))
            cells.append(f"{row[metric]:.3f} [{seeds}]")
            cells.append("baseline" if row["arm"] == baseline else
                         f"{row[f'{metric}_difference']:+.3f} ({row[f'{metric}_difference_lo']:+.3f} to "
                         f"{row[f'{metric}_difference_hi']:+.3f}) [{diffs}]")
        panel = " (panel)" if row["in_panel"] and row["site"] in OUTSIDE else ""
        lines.append(f"| {row['site']}, {row['reading']}{panel} | {row['images']} ({row['malignant']}) | "
                     f"{row['classes']} | {row['arm']} | " + " | ".join(cells) + " |")
    lines += ["", f"Rule ({rule}): {rule_words(limits)}.", "",
              "| arm | panel ROC-AUC, difference (seeds) | panel balanced accuracy, difference (seeds) | worst site "
              "(ROC-AUC; balanced accuracy) | HAM10000 val | BCN20000 val | verdict |", "|---|---|---|---|---|---|---|"]
    for row in verdict.to_dict("records"):
        cells = []
        for metric in FOUR_METRICS:
            seeds = ", ".join(f"{row[f'panel_{metric}_difference_seed{s}']:+.3f}" for s in range(n_seeds))
            cells.append(f"{row[f'panel_{metric}']:.3f}, {row[f'panel_{metric}_difference']:+.3f} [{seeds}]")
        worst = "; ".join(f"{row[f'worst_site_{m}']} {row[f'worst_site_{m}_difference']:+.3f}" for m in FOUR_METRICS)
        guards = [" / ".join(f"{row[f'{g}_{m}_difference']:+.3f}" for m in FOUR_METRICS)
                  if pd.notna(row.get(f"{g}_roc_auc_difference")) else "not a guard" for g in FOUR_GUARDS]
        lines.append(f"| {row['arm']} | {cells[0]} | {cells[1]} | {worst} | {guards[0]} | {guards[1]} | "
                     f"{'passes' if row['passes'] else 'fails'} |")
    return "\n".join(lines) + "\n"


def main_four(args, arms, device):
    adjust = dict(spec.partition("=")[::2] for spec in args.adjust)
    for name, adjustment in adjust.items():
        if name not in arms or adjustment not in ADJUSTMENTS:
            fail(f"--adjust {name}={adjustment}", "expects ARM=la or ARM=pb for an arm given with --arm")
    unknown = set(args.tta) - set(arms)
    if unknown:
        fail("--tta", f"names no arm: {', '.join(sorted(unknown))}")
    # a run whose weights are not here is read from its record
    arms = {name: [run if (run / "model.pt").is_file() or args.record is None else args.record / run.name
                   for run in runs] for name, runs in arms.items()}
    scored = {}
    for name, runs in tqdm(arms.items(), desc="scoring arms"):
        for s, run in enumerate(runs):
            scored[name, s] = score_run_four(run, args.cache_pattern, args.keep, device, tta=name in args.tta)
            if args.record and (run / "model.pt").is_file() and (run / "config.json").is_file():  # a trained run
                record_run(run, scored[name, s], args.record, tta=name in args.tta)
            if name in adjust:
                scored[name, s] = adjusted_scores(scored[name, s], run, adjust[name])
    rows = []
    for site, _, _, _, readings in FOUR_SITES:
        for k, reading in enumerate(readings):
            tables = {key: result[site, reading] for key, result in scored.items()}
            for row in compare_site_four(tables, arms, args.bootstrap, args.seed):
                rows.append({"site": site, "reading": reading, "in_panel": k == 0, **row})
    table = pd.DataFrame(rows)
    baseline = list(arms)[0]
    bcn_guard = {name: all(trains_on(run, "bcn20000_84") for run in arms[name] + arms[baseline]) for name in arms}
    verdict = verdicts_four(table, arms, args.rule, bcn_guard)
    write_csv(verdict, args.out.parent / f"{args.out.name}_verdicts.csv")
    write_table_and_markdown(table, markdown_four(table, verdict, arms, args.rule), args.out)
    print(f"wrote {args.out.with_suffix('.csv')} and {args.out.with_suffix('.md')}")


@one_line_errors
def main(args):
    arms = parse_arms(args.arm)
    if args.four:
        return main_four(args, arms, pick_device(args.device))
    unknown = set(args.general_sites) - set(arms)
    if unknown:
        fail("--general-sites", f"names no arm: {', '.join(sorted(unknown))}")
    device = pick_device(args.device)
    scored = {}
    for name, runs in tqdm(arms.items(), desc="scoring arms"):
        for s, run in enumerate(runs):
            members = [Path(member) for member in str(run).split("+")]
            scored[name, s] = ensemble_scores([score_run(member, args.cache_pattern, name in args.general_sites,
                                                         args.keep, device) for member in members])
    rows = []
    for site, _, _, readings in SITES:
        for k, reading in enumerate(readings):
            tables = {key: result[site, reading] for key, result in scored.items()}
            for row in compare_site(tables, arms, args.bootstrap, args.seed):
                rows.append({"site": site, "reading": reading, "in_panel": k == 0, **row})
    table = pd.DataFrame(rows)
    verdict = verdicts(table, arms, args.rule)
    write_csv(verdict, args.out.parent / f"{args.out.name}_verdicts.csv")
    write_table_and_markdown(table, markdown(table, verdict, arms, args.rule), args.out)
    print(f"wrote {args.out.with_suffix('.csv')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main(parse_args())
