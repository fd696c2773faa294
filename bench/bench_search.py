"""The frontier by search against the grid: optimizer steps spent to place ℓ*(r) within 5%, ranks 1, 2, 4.

    python bench/bench_search.py [--home DIR] [--ranks 1 2 4] [--seeds 0 1] [--method sft] [--resolution 0.05]

The search runs on the shipped capacity sweep's setting (sample_data/sweeps/capacity_bypass_random.csv: the paper's
bypass adapter on the default model, dropout 0.1, lr 3e-2, at most 300 steps, until converged, the first ℓ of 192
random tokens per seed), into a store under --home (default: a folder under the system's temp dir, kept, so an
interrupted run continues where it stopped). It prints each rank's bracket and the steps its probes took.

The grid needed for the same resolution has lengths (1 + resolution)^k apart. Two such grids are priced:
  - over the shipped sweep's range (16 to 192 tokens: what was chosen there without knowing the frontier), each
    point's steps read from the shipped sweep's measured steps at the same rank (the mean over its seeds),
    interpolated in log ℓ between its lengths;
  - over only the lengths the search itself probed at each rank (a grid told where to look), each point's steps
    interpolated in log ℓ from the search's own probes on the same side of the frontier.
The ratio printed is the search's measured steps over each grid's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "sample_data" / "sweeps" / "capacity_bypass_random.csv"


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """ys at x, linear in log x, flat beyond the ends."""
    order = np.argsort(xs)
    return float(np.interp(np.log(x), np.log(np.asarray(xs, dtype=float)[order]), np.asarray(ys, dtype=float)[order]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=Path(tempfile.gettempdir()) / "memcore-bench-search")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--method", default="sft")
    ap.add_argument("--resolution", type=float, default=0.05)
    ap.add_argument("--batch", default="auto")
    ap.add_argument("--name", help="the search's id (default: memcore's hash of its settings)")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: report the probes already in the store (a search cut off, or finished)")
    args = ap.parse_args()

    import pandas as pd

    from memcore.config import AdapterSpec, DataSpec, ModelSpec, RunSpec, TrainSpec
    from memcore.home import default_model_dir
    from memcore.search import FrontierSearch, SearchSpec, grid_lengths, search_result
    from memcore.store import Store

    args.home.mkdir(parents=True, exist_ok=True)
    if not (args.home / "models").exists():
        (args.home / "models").symlink_to(default_model_dir().parent, target_is_directory=True)
    template = RunSpec(model=ModelSpec(), adapter=AdapterSpec(kind="bypass", rank=1, layers="paper", dropout=0.1),
                       data=DataSpec(random_tokens=192),
                       train=TrainSpec(max_steps=300, lr=3e-2, until="converged", history="decimated"))
    search = SearchSpec(template=template, ranks=tuple(args.ranks), methods=(args.method,), seeds=tuple(args.seeds),
                        resolution=args.resolution, name=args.name)
    fs = FrontierSearch(search, Store(args.home), batch=args.batch if args.batch == "auto" else int(args.batch))
    t0 = time.perf_counter()
    if args.report_only:
        fs.read()  # every verdict already in the store: nothing trained
        p = fs.progress()
    else:
        done = -1
        for p in fs.run():
            if p.probes_done == done:  # progress while probes train: print only when one completes
                continue
            done = p.probes_done
            print(f"[{time.perf_counter() - t0:6.0f} s] probes {p.probes_done:3d} done, {p.in_flight} training, "
                  f"{p.steps} steps   " + "   ".join(f"r={b.rank}: [{b.lo}, {b.hi}]" for b in p.brackets),
                  flush=True)
    result = search_result(fs, p)
    print(f"\nsearch {search.id}: {p.probes_done} probes, {p.steps} steps, {time.perf_counter() - t0:.0f} s this time")
    for row in result.rows():
        print(f"  rank {row['rank']}: ℓ* in [{row['lo']}, {row['hi']}] ({row['outcome']}, ≈ {row['ell_star']:.1f}); "
              f"recall rate {row['lo_rate']} at {row['lo']}, {row['hi_rate']} at {row['hi']}; "
              f"{row['probes']} lengths probed, {row['steps']} steps"
              + (f"; fitted {row['fitted_ell_star']:.1f} [{row['fitted_interval'][0]:.1f}, "
                 f"{row['fitted_interval'][1]:.1f}], {row['bits_per_param']:.3f} bits/param"
                 if "fitted_ell_star" in row else ""))
    fit = result.fits.get(args.method)
    if fit is not None:
        lo, hi = fit.gamma_interval
        print(f"  fitted ℓ*(r) = {np.exp(fit.a):.3g} · r^{fit.gamma:.3f}, γ 95% [{lo:.3f}, {hi:.3f}]")

    shipped = pd.read_csv(SHIPPED)
    shipped = shipped[shipped["method"] == args.method]
    probes = pd.DataFrame([r for r in fs.store.runs(sweep=search.id, status="completed")])
    per = []
    total_wide = total_narrow = 0.0
    for b in fs.brackets:
        cells = shipped[shipped["rank"] == b.rank].groupby("length")["steps"].mean()
        wide = grid_lengths(16, 192, args.resolution)
        steps_wide = len(args.seeds) * sum(_interp(n, list(cells.index), list(cells.values)) for n in wide)
        lengths = sorted(b.probed)
        mine = {n: np.mean([s["steps"] for s in _probe_summaries(probes, b, n)]) for n in lengths}
        narrow = grid_lengths(min(lengths), max(lengths), args.resolution)
        ok = [n for n in lengths if b.rate(n) >= 0.5]
        bad = [n for n in lengths if b.rate(n) < 0.5]
        steps_narrow = 0.0
        for n in narrow:
            side = ok if (b.lo is not None and n <= b.lo) or not bad else bad
            steps_narrow += len(args.seeds) * _interp(n, side, [mine[k] for k in side])
        total_wide += steps_wide
        total_narrow += steps_narrow
        per.append((b.rank, b.steps, len(wide), steps_wide, len(narrow), steps_narrow))
    print(f"\ngrid at the same resolution ({args.resolution:.0%} apart), {len(args.seeds)} seeds:")
    for rank, mine_steps, nw, sw, nn, sn in per:
        print(f"  rank {rank}: search {mine_steps} steps; grid over 16-192 tokens {nw} lengths ≈ {sw:.0f} steps "
              f"(ratio {mine_steps / sw:.3f}); grid over the searched range {nn} lengths ≈ {sn:.0f} steps "
              f"(ratio {mine_steps / sn:.3f})")
    print(f"  all ranks: search {p.steps} steps against {total_wide:.0f} (16-192 grid): ratio "
          f"{p.steps / total_wide:.3f}; against {total_narrow:.0f} (searched range): ratio "
          f"{p.steps / total_narrow:.3f}")


def _probe_summaries(probes, b, length):
    import json

    out = []
    for _, r in probes.iterrows():
        v = json.loads(r["label"])
        if v["rank"] == b.rank and v["length"] == length and v["method"] == b.method:
            out.append({"steps": r["summary"].steps})
    return out


if __name__ == "__main__":
    main()
