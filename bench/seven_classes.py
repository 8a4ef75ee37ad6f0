"""Compare 7-class recipes on HAM10000 val (docs/seven_classes.md), each arm at several seeds,
paired against the first arm (the baseline) seed by seed, and apply the protocol's rule.

An arm's runs are model folders (their val_probs.csv, written by train.py) or probability files
(evaluate.py's test_probs.csv of the val split, for the test-time augmentation arm), one per seed
in the same order for every arm. Every file must hold the same images. For each run: balanced
accuracy of the most likely class, macro one-vs-rest ROC-AUC and melanoma recall; for each arm
beside the baseline: the seed-mean difference in balanced accuracy, its 95% interval (bootstrap
over lesions, the same resamples for every seed and arm), each seed's own difference, and the
rule's verdict (--rule screen or keep; --rule ship: K4, the head on the shipped network, against the
recipe the keep rule chose, which it replaces when at most 0.020 below it).
Writes --out.csv (every figure) and --out.md (the table and verdicts).

--decide applies the protocol to make seven-full's tables: S if it passed the keep rule against K0,
else K0; then K4 if it passed the ship rule against that recipe; of the shipped arm's seeds, the one
with the higher val balanced accuracy. Prints the reasons, and the run to export on the last line.

Examples: python bench/seven_classes.py --arm K0=runs/seven/K0_s0,runs/seven/K0_s1
              --arm K1=runs/seven/K1_s0,runs/seven/K1_s1 --rule screen --out bench/results/seven/screen
          python bench/seven_classes.py --decide bench/results/seven --runs runs/seven_full
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import (CLASS_COLUMNS, DX_CODES, fail, group_members, multiclass_figures, one_line_errors,  # noqa: E402
                    paired_differences, read_csv, read_probs, write_table_and_markdown)
from panel import parse_arms  # noqa: E402  (the same --arm NAME=RUN,RUN)

# the protocol's rules: (least seed-mean gain in balanced accuracy, least gain of every seed; None:
# no such clause: two short runs of one recipe differ by 0.05, so a screen judges their mean alone).
# ship: K4 is one pass of the shipped network, faster and smaller than a second network, so it may
# cost up to 0.020 of the chosen recipe's balanced accuracy
RULES = {"screen": (0.010, None), "keep": (0.010, 0.0), "ship": (-0.020, None)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", action="append", metavar="NAME=RUN,RUN",
                   help="an arm and its runs (or probability files), one per seed; the first arm is the baseline")
    p.add_argument("--rule", choices=sorted(RULES), default="screen")
    p.add_argument("--out", type=Path, help="output path without suffix (.csv and .md)")
    p.add_argument("--decide", type=Path, metavar="DIR", help="the folder of make seven-full's tables "
                   "(full.csv, full_K4_vs_<arm>.csv): print the run to ship")
    p.add_argument("--runs", type=Path, default=Path("runs/seven_full"), help="with --decide: the runs' folder")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.decide and not (args.arm and args.out):
        p.error("give --arm (at least one) and --out, or --decide")
    return args


def read_arm_probs(path):
    path = Path(path)
    file = path / "val_probs.csv" if path.is_dir() else path
    probs = read_probs(file, ["image_id", "lesion_id", "dx", *CLASS_COLUMNS])
    if not probs["dx"].isin(DX_CODES).all():
        fail(file, "holds a dx that is not one of the 7 HAM10000 classes")
    return probs.sort_values("image_id").reset_index(drop=True)


def figures(truth, class_probs):
    """(balanced accuracy, macro ROC-AUC, melanoma recall) of the most likely class, over the
    classes present."""
    per_class = multiclass_figures(truth, class_probs)
    present = np.bincount(truth, minlength=len(DX_CODES)) > 0
    return (float(np.mean(per_class["recall"][present])), float(np.mean(per_class["roc_auc"][present])),
            float(per_class["recall"][DX_CODES.index("mel")]))


def compare(arms, n_resamples, seed):
    names = list(arms)
    n_seeds = len(arms[names[0]])
    tables = {(name, s): read_arm_probs(run) for name in names for s, run in enumerate(arms[name])}
    first = tables[names[0], 0]
    for key, table in tables.items():
        if list(table["image_id"]) != list(first["image_id"]):
            fail(arms[key[0]][key[1]], f"scores other images than {arms[names[0]][0]}; arms are compared on one set")
    truth = np.array([DX_CODES.index(dx) for dx in first["dx"]])
    probs = {key: table[CLASS_COLUMNS].to_numpy() for key, table in tables.items()}
    members = group_members(first["lesion_id"])

    def balanced_accuracy(name, s, pick):
        pick = slice(None) if pick is None else pick
        return figures(truth[pick], probs[name, s][pick])[0]

    compared = paired_differences(balanced_accuracy, arms, n_seeds, members, n_resamples, seed)
    rows = []
    for name in names:
        per_seed = [figures(truth, probs[name, s]) for s in range(n_seeds)]
        _, differences, (low, high) = compared[name]
        diffs, low, high = [float(d) for d in differences[:, 0]], low[0], high[0]
        rows.append({"arm": name, "images": len(truth), "lesions": len(members),
                     "balanced_accuracy": float(np.mean([f[0] for f in per_seed])),
                     **{f"balanced_accuracy_seed{s}": f[0] for s, f in enumerate(per_seed)},
                     "macro_roc_auc": float(np.mean([f[1] for f in per_seed])),
                     "melanoma_recall": float(np.mean([f[2] for f in per_seed])),
                     "difference": float(np.mean(diffs)), "difference_lo": low, "difference_hi": high,
                     **{f"difference_seed{s}": d for s, d in enumerate(diffs)}})
    return pd.DataFrame(rows)


def verdicts(table, rule, n_seeds):
    least_gain, every_seed = RULES[rule]
    seed_diffs = table[[f"difference_seed{s}" for s in range(n_seeds)]]
    return (table["difference"] >= least_gain) & (every_seed is None or seed_diffs.min(axis=1) >= every_seed)


def markdown(table, arms, rule):
    least_gain, every_seed = RULES[rule]
    n_seeds = len(next(iter(arms.values())))
    baseline = list(arms)[0]
    lines = [f"HAM10000 val, {table['images'].iloc[0]} images of {table['lesions'].iloc[0]} lesions. Baseline: "
             f"`{baseline}`. Figures are means of {n_seeds} seeds (each seed in brackets); differences in balanced "
             "accuracy are paired seed by seed, with 95% bootstrap intervals over lesions.", "",
             "| arm | balanced accuracy (seeds) | macro ROC-AUC | melanoma recall | difference (seeds) | verdict |",
             "|---|---|---|---|---|---|"]
    for row in table.to_dict("records"):
        seeds = ", ".join(f"{row[f'balanced_accuracy_seed{s}']:.3f}" for s in range(n_seeds))
        seed_diffs = ", ".join(f"{row[f'difference_seed{s}']:+.3f}" for s in range(n_seeds))
        first = row["arm"] == baseline
        difference = "baseline" if first else \
            f"{row['difference']:+.3f} ({row['difference_lo']:+.3f} to {row['difference_hi']:+.3f}) [{seed_diffs}]"
        verdict = "" if first else ("passes" if row["passes"] else "fails")
        lines.append(f"| {row['arm']} | {row['balanced_accuracy']:.3f} [{seeds}] | {row['macro_roc_auc']:.3f} | "
                     f"{row['melanoma_recall']:.3f} | {difference} | {verdict} |")
    lines += ["", f"Rule ({rule}): seed-mean balanced accuracy {least_gain:+.3f} or more against the baseline" +
              ("." if every_seed is None else f", and no seed's own difference below {every_seed:+.3f}.")]
    return "\n".join(lines) + "\n"


def read_table(path):
    if not path.is_file():
        fail(path, "not found: run make seven-full first")
    table = read_csv(path).set_index("arm")
    if "passes" not in table.columns:
        fail(path, "is no table of bench/seven_classes.py")
    return table


def decide(folder, runs):
    """(reasons, the run to export) by the protocol (docs/seven_classes.md, its full length)."""
    full = read_table(folder / "full.csv")
    recipe = "S" if str(full.loc["S", "passes"]) == "True" else "K0"
    reasons = [f"S against K0: {full.loc['S', 'difference']:+.3f} ({full.loc['S', 'difference_lo']:+.3f} to "
               f"{full.loc['S', 'difference_hi']:+.3f}): the recipe is {recipe}"]
    k4 = read_table(folder / f"full_K4_vs_{recipe}.csv")
    shipped = "K4" if str(k4.loc["K4", "passes"]) == "True" else recipe
    reasons.append(f"K4 against {recipe}: {k4.loc['K4', 'difference']:+.3f} (ships at -0.020 or more): {shipped} ships")
    table = k4 if shipped == "K4" else full
    seeds = sorted(int(c.removeprefix("balanced_accuracy_seed")) for c in table.columns
                   if c.startswith("balanced_accuracy_seed"))
    accuracy = [float(table.loc[shipped, f"balanced_accuracy_seed{s}"]) for s in seeds]
    seed = seeds[int(np.argmax(accuracy))]
    reasons.append(f"{shipped}'s seeds on val: " + ", ".join(f"s{s} {a:.4f}" for s, a in zip(seeds, accuracy)) +
                   f": seed {seed}")
    return reasons, runs / f"{shipped}_s{seed}"


@one_line_errors
def main(args):
    if args.decide:
        reasons, run = decide(args.decide, args.runs)
        print("\n".join(reasons))
        print(run)
        return
    arms = parse_arms(args.arm)
    table = compare(arms, args.bootstrap, args.seed)
    n_seeds = len(next(iter(arms.values())))
    passes = verdicts(table, args.rule, n_seeds).astype(object)
    passes.iloc[0] = None  # the baseline is judged against nothing
    table["passes"] = passes
    write_table_and_markdown(table, markdown(table, arms, args.rule), args.out)
    print(f"wrote {args.out.with_suffix('.csv')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main(parse_args())
