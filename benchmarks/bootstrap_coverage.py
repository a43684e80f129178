"""Coverage of the intervals over eval documents on synthetic data with known truth (issue 22).

Runs tests/test_bootstrap_coverage.py's model for more draws and compares, per statistic, the
interval compute-metrics reports (``jackknife``: bias-corrected delete-one jackknife, links
fixed on the full sample) with the alternatives measured to choose it:

- ``jack``: the jackknife interval without its bias correction;
- ``percentile``, ``basic``, ``BCa``, ``normal-bc``: the bootstrap (``--boot`` resamples,
  links fixed), percentile interval, basic (reflected), BCa (acceleration from the jackknife)
  and normal with the bootstrap's bias and standard deviation;
- ``legacy``: the rule before issue 22 (eligibility re-decided in each resample) with its
  percentile interval, for the macro averages.

Each cell is the share of draws whose 95% interval covers the population value, the share
containing its own point in brackets. Settings (``--settings``, comma-separated):

- ``test``: the test's, 200 documents, 40 links, link_min_docs 20;
- ``default``: the same with link_min_docs 5 (params.yaml's metrics.link_min_docs);
- ``grouped``: 600 documents in 200 jackknife groups (documents outnumber the rows);
- ``rare``: 150 documents, 18 links, one child in three rare (a third of the links rest on
  fewer than 5 documents), link_min_docs 5.

    python benchmarks/bootstrap_coverage.py --draws 500 --boot 200
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsae_core.evaluation.bootstrap import Z975, interval, jackknife  # noqa: E402
from tests.test_bootstrap_coverage import (  # noqa: E402
    DocModel,
    Setup,
    coverage,
    realistic,
    table,
)

METHODS = ("jackknife", "jack", "percentile", "basic", "BCa", "normal-bc", "legacy")
SETTINGS = {
    "test": ("200 documents, 40 links, link_min_docs 20 (the test's)",
             Setup(n_docs=200, min_docs=20), realistic),
    "default": ("200 documents, 40 links, link_min_docs 5 (params.yaml's)",
                Setup(n_docs=200, min_docs=5), realistic),
    "grouped": ("600 documents in 200 jackknife groups, 40 links, link_min_docs 20",
                Setup(n_docs=600, rows=200, min_docs=20), realistic),
    "rare": ("150 documents, 18 links, a third of them rare, link_min_docs 5",
             Setup(n_docs=150, min_docs=5), lambda: DocModel.make(0)),
}


def bca(boot: torch.Tensor, point: float, jack: torch.Tensor) -> tuple[float, float]:
    """BCa bounds from bootstrap values, the acceleration from jackknife values."""
    n = boot.numel()
    share = (float((boot < point).sum()) + 0.5 * float((boot == point).sum())) / n
    share = min(max(share, 0.5 / n), 1 - 0.5 / n)
    z0 = float(torch.special.ndtri(torch.tensor(share, dtype=torch.float64)))
    u = jack.mean() - jack
    ss = float(u.pow(2).sum())
    a = float(u.pow(3).sum()) / (6 * ss ** 1.5) if ss > 0 else 0.0
    levels = [float(torch.special.ndtr(torch.tensor(z0 + (z0 + z) / (1 - a * (z0 + z)),
                                                    dtype=torch.float64)))
              for z in (-Z975, Z975)]
    lo, hi = torch.quantile(boot, torch.tensor(levels, dtype=boot.dtype)).tolist()
    return lo, hi


def methods(values: torch.Tensor, old: torch.Tensor | None, n_boot: int) -> dict:
    """Every method's 95% interval from the rows ``[point, bootstrap, jackknife]``."""
    values = values.double()
    point = float(values[0])
    jack_rows = torch.cat([values[:1], values[1 + n_boot:]])
    boot = values[1:1 + n_boot]
    bias, se, _ = jackknife(jack_rows)
    q = lambda v, p: torch.quantile(v, torch.tensor(p, dtype=v.dtype)).tolist()  # noqa: E731
    pl, ph = q(boot, [0.025, 0.975])
    b_bias, b_sd = float(boot.mean()) - point, float(boot.std())
    out = {"jackknife": interval(jack_rows)[1:],
           "jack": (point - Z975 * se, point + Z975 * se),
           "percentile": (pl, ph), "basic": (2 * point - ph, 2 * point - pl),
           "BCa": bca(boot, point, values[1 + n_boot:]),
           "normal-bc": (point - b_bias - Z975 * b_sd, point - b_bias + Z975 * b_sd)}
    if old is not None:
        out["legacy"] = tuple(q(old.double()[1:1 + n_boot], [0.025, 0.975]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=500, help="eval samples per setting")
    ap.add_argument("--boot", type=int, default=200, help="bootstrap resamples per sample")
    ap.add_argument("--settings", default="test,default,grouped,rare",
                    help="comma-separated: " + ", ".join(SETTINGS))
    ap.add_argument("--seed", type=int, default=1, help="seed of the draws")
    args = ap.parse_args()
    print(f"# Coverage of 95% intervals, {args.draws} draws per setting, {args.boot} bootstrap "
          f"resamples ({date.today().isoformat()}; python benchmarks/bootstrap_coverage.py "
          f"--draws {args.draws} --boot {args.boot} --settings {args.settings} "
          f"--seed {args.seed})")
    for name in args.settings.split(","):
        label, setup, make = SETTINGS[name]
        setup = Setup(**{**setup.__dict__, "n_boot": args.boot})
        start = time.perf_counter()
        cov = coverage(args.draws, setup, make(), seed=args.seed, methods=methods)
        print(f"\n## {name}: {label} ({time.perf_counter() - start:.0f} s)\n")
        print(table(cov, METHODS))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
