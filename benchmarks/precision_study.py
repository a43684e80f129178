"""Does a training precision change the results? Runs of one precision against a seed study of
the other.

    python benchmarks/precision_study.py --reference fp32_seed_study.csv \\
        --runs s0/metrics.json s1/metrics.json ...   # metrics.json of runs in the other precision

The reference is a seed study's CSV (one value per seed for every metric of every arm and
paired difference: results/seed_study.csv, or an earlier one from git: the fp32 study is
``git show 4f1658f:results/seed_study.csv``); the runs are metrics.json files of the same
seeds trained in the other precision (issue 23: ``sae.autocast_dtype``, ``auto`` is bf16 on
this CPU since the default switched; ``null`` is fp32). Per metric: both means, the difference
of means with a Welch 95% interval (the seed-to-seed spread of each side is the noise a
precision change must rise above), and whether the interval holds 0. The same seeds on both
sides are not paired: a precision change perturbs a run's trajectory as much as another seed
would, so pairing by seed buys nothing. Evaluation is fp32 whatever the training precision
(``autocast_dtype`` is the Trainer's, since 45cb09b). Every arm trains in the configured
precision since the Matryoshka got its autocast path; runs made before that trained it in fp32
either way, a control whose values equal the reference's seeds wherever it trained at the
reference's thread count (the thread count alone moves a trained model slightly).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path

from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hsae_core.pipeline.seed_study import values_of  # noqa: E402

GROUPS = ("hsae", "posthoc", "matryoshka", "diff", "diff_matryoshka")


def reference_values(path: Path) -> dict[str, tuple[str, list[float]]]:
    out = {}
    for row in csv.DictReader(path.open()):
        seeds = [float(row[k]) for k in row if k.startswith("seed ") and row[k] not in ("", None)]
        out[f"{row['group']}.{row['metric']}"] = (row["label"], seeds)
    return out


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Difference of means b - a and its Welch 95% interval. With one run on the ``b`` side
    its spread is unknown: the run gets the reference's (a prediction interval, t on the
    reference's n - 1 degrees of freedom)."""
    ma, mb = statistics.mean(a), statistics.mean(b)
    va = statistics.variance(a) / len(a)
    if len(b) == 1:
        se = math.sqrt(va * (1 + len(a)))
        return mb - ma, mb - ma - stats.t.ppf(0.975, len(a) - 1) * se, \
            mb - ma + stats.t.ppf(0.975, len(a) - 1) * se
    vb = statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return mb - ma, mb - ma, mb - ma
    df = (va + vb) ** 2 / sum(v * v / (len(x) - 1) for v, x in ((va, a), (vb, b)) if v > 0)
    half = stats.t.ppf(0.975, df) * se
    return mb - ma, mb - ma - half, mb - ma + half


def compare(reference: Path, runs: list[Path]) -> list[dict]:
    ref = reference_values(reference)
    other = [values_of(json.loads(p.read_text())) for p in runs]
    rows = []
    for key, (label, a) in ref.items():
        if key.split(".")[0] not in GROUPS:
            continue
        b = [v[key][0] for v in other if v.get(key) and v[key][0] is not None]
        if len(a) < 2 or len(b) < 1:
            continue
        diff, lo, hi = (float(v) for v in welch(a, b))  # scipy's t gives numpy floats
        rows.append({"key": key, "label": label, "n_ref": len(a), "n_runs": len(b),
                     "ref_mean": statistics.mean(a), "runs_mean": statistics.mean(b),
                     "ref_sd": statistics.stdev(a), "diff": diff, "lo": lo, "hi": hi,
                     "holds_zero": bool(lo <= 0 <= hi)})
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, default=Path("results/seed_study.csv"))
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = compare(args.reference, args.runs)
    print(f"{'group.metric':34s} {'label':24s} {'reference':>10s} {'runs':>10s} "
          f"{'runs - ref [95%]':>30s}")
    for r in rows:
        flag = "" if r["holds_zero"] else "  *"
        print(f"{r['key']:34s} {r['label'][:24]:24s} {r['ref_mean']:10.4f} {r['runs_mean']:10.4f}"
              f" {r['diff']:+10.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]{flag}")
    moved = [r["key"] for r in rows if not r["holds_zero"]]
    print(f"{len(rows) - len(moved)} of {len(rows)} intervals hold 0 "
          f"(reference n={rows[0]['n_ref'] if rows else 0}, runs n={len(args.runs)}); "
          f"moved: {', '.join(moved) or 'none'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
