"""MemFT against SFT at equal steps on a sweep: exact-recall rate, token accuracy and verbatim prefix, per cell and
overall, with ratios (method / sft). Reads a sweep CSV (default: the shipped capacity sweep).

    python bench/bench_memft.py [--csv sample_data/sweeps/capacity_bypass_random.csv] [--baseline sft]

Prints one line per (method, rank, length) cell, marking where MemFT does not win, then the overall ratios.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memcore.frontier import method_comparison  # noqa: E402
from memcore.law import read_law_csv  # noqa: E402

DEFAULT = Path(__file__).resolve().parent.parent / "sample_data" / "sweeps" / "capacity_bypass_random.csv"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", default=str(DEFAULT))
    ap.add_argument("--baseline", default="sft")
    args = ap.parse_args()
    df = read_law_csv(args.csv)
    cells, overall = method_comparison(df, args.baseline)
    b = args.baseline
    seeds = df.groupby(["method", "rank", "length"]).size().min()
    print(f"{args.csv}: {len(df)} points, at least {seeds} seed(s) per cell; both methods get the same step budget "
          "(a point run --until converged stops earlier once converged: 'steps' is what it used)")
    print(f"{'method':<9} {'rank':>4} {'len':>5} | {'recall':>6} {b:>6} | {'tok acc':>7} {b:>6} | "
          f"{'prefix':>6} {b:>6} | "
          f"{'steps':>5} {b:>5} | wins")
    def pair(r, c: str, f: str) -> str:
        return f"{r[c]:{f}} {r[c + '_' + b]:{f}}" if c in r else f"{'-':>6} {'-':>6}"

    for _, r in cells.iterrows():
        v = lambda c, f, r=r: pair(r, c, f)  # noqa: E731
        print(f"{r['method']:<9} {r['rank']:>4} {r['length']:>5} | {v('exact_recall', '>6.2f')} | "
              f"{v('token_accuracy', '>6.3f')} | "
              f"{v('verbatim_prefix', '>6.1f')} | {v('steps', '>5.0f')} | {r.get('wins', '-')}")
    for _, o in overall.iterrows():
        print(f"\n{o['method']} vs {b} over {o['cells']} cells (means; ratio = {o['method']} / {b}):")
        for c in ("exact_recall", "token_accuracy", "verbatim_prefix", "frac_above", "delta_loss", "steps"):
            if c in overall.columns:
                print(f"  {c:<16} {o[c]:8.3f} vs {o[f'{c}_{b}']:8.3f}   ratio {o[f'{c}_ratio']:.3f}")
        if "wins" not in cells.columns:
            continue
        lost = cells[(cells["method"] == o["method"]) & (cells["wins"] == "no")]
        where = ", ".join(f"r={r}/ℓ={ell}" for r, ell in zip(lost["rank"], lost["length"])) or "nowhere"
        print(f"  does not win at: {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
