"""Sweep throughput: the same grid trained one point at a time and as one batch, in the same run, as a ratio.

    python bench/bench_batch.py [--ranks 1 2 4] [--lengths 16 24 32 48 64] [--methods sft memft-ot]
                                [--max-steps 40] [--batch 16] [--device auto]
    python bench/bench_batch.py --rss 32x64          # peak RSS of a batch of 32 bypass runs at 64 random tokens

The grid is the shipped capacity sweep's setting (sample_data/sweeps/capacity_bypass_random.csv): the paper's
bypass adapter on the default model, random tokens, lr 3e-2, dropout off (so both modes give the same numbers),
every point trained its whole step budget (equal work in both modes). Each mode runs in a process of its own,
into a scratch store, and prints: points per hour, peak RSS, and the FLOP rate achieved (the FLOPs of one
training step of every point, counted by torch's FlopCounterMode, times the steps, over the training time). The
parent then prints the ratio, and checks that every point's ΔL is the same in both modes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent.parent


def _sweep(args):
    from memcore.config import AdapterSpec, DataSpec, ModelSpec, RunSpec, TrainSpec
    from memcore.sweep import SweepSpec

    template = RunSpec(model=ModelSpec(device=args.device),
                       adapter=AdapterSpec(kind="bypass", rank=1, layers="paper", dropout=0.0),
                       data=DataSpec(random_tokens=max(args.lengths)),
                       train=TrainSpec(max_steps=args.max_steps, lr=3e-2, checkpoint_every=0, history="decimated"))
    return SweepSpec(template=template, ranks=tuple(args.ranks), lengths=tuple(args.lengths),
                     methods=tuple(args.methods), seeds=(0,), name="bench")


def step_flops(base, sweep) -> int:
    """FLOPs of one training step (forward and backward, frozen prefix and all, as bench_engine counts them) of
    every point of the sweep, each alone."""
    from bench_engine import count_step_flops

    from memcore.data import make_batch
    from memcore.runner import prepare
    from memcore.sweep import points

    total = 0
    for p in points(sweep):
        _, samples = prepare(p.spec, base)
        batch = make_batch(samples, base.tokenizer.pad_token_id).to(base.device)
        with base.adapted(p.spec.adapter, seed=0) as m:
            total += count_step_flops(m, batch, p.spec.train)
    return total


def one(args) -> dict:
    """One mode in this process: train the grid into a scratch store; times, rates, peak RSS, each point's ΔL."""
    from memcore.home import default_model_dir
    from memcore.loading import load_base
    from memcore.store import Store
    from memcore.sweep import run_sweep

    sweep = _sweep(args)
    models = default_model_dir().parent
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "models").symlink_to(models, target_is_directory=True)
        base = load_base(sweep.template.model, Path(d))
        t0 = time.perf_counter()
        results = list(run_sweep(sweep, Store(Path(d)), base=base, batch=args.one_batch))
        seconds = time.perf_counter() - t0
        flops = step_flops(base, sweep) if args.flops else None
    steps = sum(r.summary.steps for r in results)
    return {"points": len(results), "seconds": seconds, "points_per_hour": 3600 * len(results) / seconds,
            "steps": steps, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "flops_per_step_all_points": flops,
            "gflops_per_s": flops * args.max_steps / seconds / 1e9 if flops else None,
            "delta_loss": {json.dumps(r.values, sort_keys=True): r.summary.delta_loss for r in results}}


def rss(args) -> dict:
    """Peak RSS of one batch of N bypass runs at L random tokens, trained a few steps."""
    n, length = (int(x) for x in args.rss.split("x"))
    sub = argparse.Namespace(**{**vars(args), "ranks": [1], "lengths": [length], "methods": ["sft"],
                                "max_steps": 3, "one_batch": n, "flops": False})
    from memcore.sweep import SweepSpec

    sweep = _sweep(sub)
    sub_sweep = SweepSpec(template=sweep.template, ranks=(1,), lengths=(length,), methods=("sft",),
                          seeds=tuple(range(n)), name="rss")
    from memcore.home import default_model_dir
    from memcore.loading import load_base
    from memcore.store import Store
    from memcore.sweep import run_sweep

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "models").symlink_to(default_model_dir().parent, target_is_directory=True)
        base = load_base(sweep.template.model, Path(d))
        t0 = time.perf_counter()
        results = list(run_sweep(sub_sweep, Store(Path(d)), base=base, batch=n))
        seconds = time.perf_counter() - t0
    return {"runs": len(results), "tokens": length, "seconds": seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 24, 32, 48, 64])
    ap.add_argument("--methods", nargs="+", default=["sft", "memft-ot"])
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16, help="points trained together in the batched mode")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rss", metavar="NxL", help="only: peak RSS of a batch of N bypass runs at L random tokens")
    ap.add_argument("--one-batch", type=int, help=argparse.SUPPRESS)  # a child process: one mode
    ap.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss and args.one_batch is None:
        print(json.dumps(rss(args)))
        return
    if args.one_batch is not None:
        print("RESULT " + json.dumps(one(args)))
        return
    common = [a for a in sys.argv[1:]]
    out = {}
    for label, b, flops in (("one at a time", 1, True), (f"batched ({args.batch})", args.batch, False)):
        cmd = [sys.executable, __file__, *common, "--one-batch", str(b)] + (["--flops"] if flops else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), cwd=ROOT)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{label} failed:\n{done.stderr[-3000:]}")
        out[label] = json.loads(line[7:])
    solo, batched = out["one at a time"], out[f"batched ({args.batch})"]
    batched["gflops_per_s"] = solo["flops_per_step_all_points"] * args.max_steps / batched["seconds"] / 1e9
    n = solo["points"]
    print(f"grid: bypass, random tokens, ranks {args.ranks} x lengths {args.lengths} x {args.methods}: {n} points, "
          f"{args.max_steps} steps each")
    for label, r in out.items():
        print(f"  {label:<15} {r['seconds']:7.1f} s   {r['points_per_hour']:8.0f} points/hour   "
              f"peak RSS {r['peak_rss_mb']:6.0f} MB   {r['gflops_per_s']:6.1f} GFLOP/s achieved")
    print(f"  ratio batched / one at a time: {batched['points_per_hour'] / solo['points_per_hour']:.2f}x points per "
          "hour")
    diffs = [abs(batched["delta_loss"][k] - v) for k, v in solo["delta_loss"].items()]
    print(f"  same results: largest |ΔL difference| over the {len(diffs)} points {max(diffs):.2e} nats/token")


if __name__ == "__main__":
    main()
