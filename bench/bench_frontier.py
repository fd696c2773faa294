"""The frontier fit's bootstrap: every resample fitted at once (memcore.frontier._mle_many, projected Newton)
against one L-BFGS-B fit per resample (memcore.frontier._mle, how the bootstrap was fitted before), on the same
resamples of each shipped table, printed as a ratio from the same run, with how far the two answers are apart.

    python bench/bench_frontier.py [--repeats 3] [--resamples 300]

The two are interleaved (A B A B ...) and each keeps its fastest repeat, so a busy moment cannot favour one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TABLES = (("sample_data/sweeps/capacity_bypass_random.csv", "sft"),
          ("sample_data/paper/long_context_points.csv", "sft"),
          ("sample_data/paper/long_context_points.csv", "memft-ot"),
          ("sample_data/paper/long_context_points.csv", "memft-sw"))


def main() -> None:
    from memcore.frontier import _bootstrap_counts, _mle, _mle_many, _neg_log_lik, _start, recall_column
    from memcore.law import as_bool, method_rows, read_law_csv

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--resamples", type=int, default=300)
    args = p.parse_args()
    print(f"{'table':<48} {'method':<9} {'one at a time s':>15} {'batched s':>10} {'ratio':>6} "
          f"{'max |Δ(a, γ)|':>13} {'worse nll':>9}")
    for path, method in TABLES:
        df = method_rows(read_law_csv(ROOT / path), method)
        r, ell = df["rank"].to_numpy(float), df["length"].to_numpy(float)
        y = as_bool(df[recall_column(df)]).astype(float)
        lr, ll = np.log(r), np.log(ell)
        theta = _mle(lr, ll, y, _start(lr, ll, y))
        counts = _bootstrap_counts(r, y, args.resamples, seed=0)  # the resamples fit_frontier draws
        rows = [np.repeat(np.arange(len(y)), c) for c in counts]
        best = {"alone": np.inf, "batched": np.inf}
        for _ in range(args.repeats):
            t = time.perf_counter()
            alone = np.array([_mle(lr[i], ll[i], y[i], theta) for i in rows])
            best["alone"] = min(best["alone"], time.perf_counter() - t)
            t = time.perf_counter()
            batched = _mle_many(lr, ll, y, counts, theta)
            best["batched"] = min(best["batched"], time.perf_counter() - t)
        gap = float(np.abs(alone[:, :2] - batched[:, :2]).max())
        worse = sum(_neg_log_lik(b, lr[i], ll[i], y[i])[0] > _neg_log_lik(a, lr[i], ll[i], y[i])[0] + 1e-9
                    for a, b, i in zip(alone, batched, rows))
        print(f"{path:<48} {method:<9} {best['alone']:>15.3f} {best['batched']:>10.3f} "
              f"{best['alone'] / best['batched']:>5.1f}x {gap:>13.4f} {worse:>9d}")
    print("worse nll: resamples where the batched fit's likelihood is lower than the one-at-a-time fit's (of up to "
          f"{args.resamples}: those with every point, or none, recalled are dropped as fit_frontier drops them)")


if __name__ == "__main__":
    main()
