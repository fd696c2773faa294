"""The verbs of many runs: `sweep` (a grid, batched) and `frontier` (a sweep's verbatim-recall frontier, or with
--search the frontier found by bisection, memcore.search)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from memcore.cli.common import (
    SOURCES,
    StopFlag,
    given_sources,
    law_table_of,
    open_store,
    run_settings,
    run_spec,
    spec_default,
)
from memcore.config import MemcoreError


def _say_end(what: str, stopped: bool, held: str, t0: float, left: int) -> str:
    """The line a sweep ends with, on stderr: its status, what the store holds of it, this call's seconds (from
    perf_counter t0) and, with points left, how to finish them. Returns the status (stopped or completed)."""
    import time

    status = "stopped" if stopped else "completed"
    msg = f"{what} {status}: {held} in the store ({time.perf_counter() - t0:.0f} s this time)"
    if left:
        msg += f"; run the same command again to finish the {left} missing"
    print(msg, file=sys.stderr)
    return status


def cmd_sweep(args: argparse.Namespace) -> int:
    """`memcore sweep`: a grid of runs into the store, resumable; optionally its table as CSV/JSON."""
    import time

    import pandas as pd

    from memcore.sweep import SweepSpec, completed_keys, points, run_sweep, sweep_table

    if args.chain:
        return _chain_sweep(args)
    for flag, default in (("first_lengths", [16]), ("strategies", ["none", "keep-sft", "keep-memft-ot"]),
                          ("first_method", "memft-ot")):
        if getattr(args, flag) != default:
            raise MemcoreError(f"--{flag.replace('_', '-')} applies only with --chain")
    if not given_sources(args):
        args.sample = "long_archive"
    # the grid's first point stands for it; points vary rank, length, method, seed and noise (fixed budget each)
    template = run_spec(run_settings(args) | {"rank": args.ranks[0], "method": args.methods[0], "seed": args.seeds[0],
                                           "stop_when_recalled": False,
                                           "history": "full" if args.full_history else "decimated"})
    sweep = SweepSpec(template=template, ranks=tuple(args.ranks), lengths=tuple(args.lengths),
                      methods=tuple(args.methods), seeds=tuple(args.seeds), noises=tuple(args.noises), name=args.name)
    store = open_store()
    total = len(points(sweep))
    done = len(completed_keys(store, sweep))
    print(f"sweep {sweep.id}: {total} points, {done} already completed, {total - done} to run", file=sys.stderr)
    flag = StopFlag()
    restore = flag.install()
    from tqdm import tqdm

    bar = tqdm(total=total, initial=done, unit="run", file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        if args.backend == "ray":
            from memcore.sweep_ray import run_sweep_ray

            stream = run_sweep_ray(sweep, store, address=args.address, cpus_per_run=args.cpus_per_run,
                                   gpus_per_run=args.gpus_per_run, retries=args.retries, should_stop=flag,
                                   batch=args.batch)
        else:
            stream = run_sweep(sweep, store, should_stop=flag, batch=args.batch)
        for point in stream:
            v = point.values
            where = f"{v['method']} r={v['rank']} ℓ={v['length']}"
            if point.stopped:  # cut off mid-way: not a completed point (a re-run continues it)
                bar.set_postfix_str(f"{where} stopped at step {point.summary.steps}", refresh=True)
                continue
            bar.update(1)
            what = f"FAILED ({point.error[:60]})" if point.error else f"ΔL {point.summary.delta_loss:.3f}"
            bar.set_postfix_str(f"{where} {what}", refresh=True)
    finally:
        bar.close()
        restore()
    rows = sweep_table(store, sweep.id)
    left = total - len(rows)
    status = _say_end(f"sweep {sweep.id}", flag.stop, f"{len(rows)}/{total} points", t0, left)
    if args.out:
        pd.DataFrame(rows).drop(columns=["run_id"]).to_csv(args.out, index=False)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.json:
        print(json.dumps({"sweep": sweep.id, "status": status, "points": total, "completed": len(rows), "rows": rows}))
    return 0 if not flag.stop else 130




def _chain_sweep(args: argparse.Namespace) -> int:
    """`memcore sweep --chain`: chains A → B into the store (memcore.chain_sweep), resumable, progress on stderr; the
    first passages' retention as a table, optionally CSV/JSON."""
    import time

    import pandas as pd
    from tqdm import tqdm

    from memcore.chain_sweep import ChainSweepSpec, chain_table, run_chain_sweep

    if args.methods != ["sft", "memft-ot"] or args.noises != [0.0]:
        raise MemcoreError("--methods and --noises do not apply with --chain: --strategies says how each second "
                           "passage trains")
    others = [f for f in given_sources(args) if f != "--random-tokens"]
    if others:
        raise MemcoreError(f"{others[0]} does not apply with --chain: both passages are random tokens")
    if args.random_tokens is None:
        args.random_tokens = max(args.first_lengths)
    template = run_spec(run_settings(args) | {"rank": args.ranks[0], "seed": args.seeds[0], "method": args.first_method,
                                           "history": "full" if args.full_history else "decimated"})
    sweep = ChainSweepSpec(template=template, ranks=tuple(args.ranks), first_lengths=tuple(args.first_lengths),
                           second_lengths=tuple(args.lengths), strategies=tuple(args.strategies),
                           seeds=tuple(args.seeds), name=args.name)
    store = open_store()
    firsts = len(sweep.first_points())
    total = firsts * (1 + len(sweep.second_lengths) * len(sweep.strategies))
    done = len({r["label"] for r in store.runs(sweep=sweep.id, status="completed")})
    print(f"chain sweep {sweep.id}: {total} runs ({firsts} first passages, {total - firsts} chains), {done} already "
          f"completed, {total - done} to run", file=sys.stderr)
    flag = StopFlag()
    restore = flag.install()
    bar = tqdm(total=total, initial=done, unit="run", file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        ray = None if args.backend == "local" else {
            "address": args.address, "cpus_per_run": args.cpus_per_run, "gpus_per_run": args.gpus_per_run,
            "retries": args.retries}
        for point, result in run_chain_sweep(sweep, store, should_stop=flag, batch=args.batch, ray=ray):
            v, summary = point.values, result.summary
            where = f"r={v['rank']} ℓ_A={v['first_length']}" + (
                f" ℓ_B={v['second_length']} {v['strategy']}" if v["passage"] == "second" else " (first)")
            if result.stopped:
                bar.set_postfix_str(f"{where} stopped at step {summary.steps}", refresh=True)
                continue
            bar.update(1)
            if result.error:
                what = f"FAILED ({result.error[:60]})"
            elif summary.after:
                what = f"first kept {summary.earlier_above}/{summary.earlier_tokens} above τ"
            else:
                what = f"recalled: {'yes' if summary.exact_recall else 'no'} in {summary.steps} steps"
            bar.set_postfix_str(f"{where} {what}", refresh=True)
    finally:
        bar.close()
        restore()
    rows = chain_table(store, sweep.id)
    unlearned = sorted({r["first_run"] for r in rows if not r["first_recalled"]})
    if unlearned:
        print(f"note: {len(unlearned)} first passage(s) were not recalled when their own run ended (within "
              f"--max-steps); their chains measure the retention of a passage never learned, and the law page leaves "
              f"them out", file=sys.stderr)
    left = total - len(store.runs(sweep=sweep.id, status="completed"))
    status = _say_end(f"chain sweep {sweep.id}", flag.stop, f"{len(rows)} chains", t0, left)
    if rows:
        df = pd.DataFrame(rows)
        agg = df.groupby(["rank", "first_length", "second_length", "strategy"]).agg(
            seeds=("seed", "size"), kept=("retained_above", "mean"), recalled=("retained_recalled", "mean"),
            steps=("second_steps", "mean"), second=("second_recalled", "mean"), rehearsal=("rehearsal_share", "mean"))
        print("first passage after the second (means over seeds): kept = share of its tokens above τ, recalled = "
              "share of seeds recalling it verbatim; steps and recall of the second; rehearsal share of the update")
        print(agg.to_string(float_format=lambda x: f"{x:.3f}"))
    if args.out:
        pd.DataFrame(rows, columns=list(rows[0]) if rows else None).drop(columns=["run_id"], errors="ignore").to_csv(
            args.out, index=False)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.json:
        print(json.dumps({"sweep": sweep.id, "status": status, "runs": total, "chains": len(rows), "rows": rows}))
    return 0 if not flag.stop else 130


SEARCH_ONLY = ("ranks", "seeds", "resolution", "max_length", "start_length", "batch", "name")


def cmd_frontier(args: argparse.Namespace) -> int:
    """`memcore frontier`: the verbatim-recall frontier and capacity of a table (memcore.frontier), or with --search
    found by bisection (memcore.search)."""
    if args.search:
        return _frontier_search(args)
    given = [f"--{n.replace('_', '-')}" for n in SEARCH_ONLY if getattr(args, n, None) is not None]
    given += [f for f in SOURCES if getattr(args, f[2:].replace("-", "_"), None) is not None]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise MemcoreError(f"{', '.join(given)} {verb} only with --search (without it, frontier reads a sweep's table)")
    df = law_table_of(args, required=("rank", "length"))
    _print_frontier(args, df)
    return 0


def _frontier_search(args: argparse.Namespace) -> int:
    """`memcore frontier --search`: memcore.search.FrontierSearch into the store, progress on stderr, then the
    brackets, the fitted frontier over every probe and the commands that read the search like a sweep."""
    import time

    from tqdm import tqdm

    from memcore.search import (
        DEFAULT_RESOLUTION,
        DEFAULT_START,
        FrontierSearch,
        SearchSpec,
        budget_notes,
        search_result,
    )

    if args.csv:
        raise MemcoreError("--csv reads a sweep's table; --search trains its own probes (drop one of them)")
    if args.sweep:
        raise MemcoreError("--sweep reads a stored sweep or search; with --search, name the new one with --name")
    if args.seeds is not None and args.seeds < 1:
        raise MemcoreError(f"--seeds is how many seeds each length is probed with (0..K-1): at least 1, "
                           f"got {args.seeds}")
    if args.start_length is not None and args.start_length < 1:
        raise MemcoreError(f"--start-length must be at least 1 token, got {args.start_length}")
    if not given_sources(args):
        args.random_tokens = 512
    settings = run_settings(args)
    settings["model"] = args.model or spec_default("model")
    template = run_spec(settings | {"rank": 1, "method": args.method or "sft", "seed": 0,
                                    "history": "full" if args.full_history else "decimated"})
    search = SearchSpec(template=template, ranks=tuple(args.ranks or (1, 2, 4, 8)),
                        methods=(args.method or "sft",), seeds=tuple(range(args.seeds or 1)),
                        resolution=args.resolution if args.resolution is not None else DEFAULT_RESOLUTION,
                        max_length=args.max_length,
                        start_length=DEFAULT_START if args.start_length is None else args.start_length, name=args.name)
    store = open_store()
    flag = StopFlag()
    restore = flag.install()
    t0 = time.perf_counter()
    try:
        fs = FrontierSearch(search, store, batch=args.batch or "auto", should_stop=flag)
        print(f"frontier search {search.id}: ranks {', '.join(map(str, search.ranks))}, {len(search.seeds)} seed(s), "
              f"{search.methods[0]}, lengths up to {fs.longest} tokens, within {search.resolution:.0%}",
              file=sys.stderr)
        bar = tqdm(unit="probe", file=sys.stderr, dynamic_ncols=True,
                   bar_format="{n} probes done [{elapsed}]{postfix}")
        try:
            for p in fs.run():
                bar.n = p.probes_done
                bar.set_postfix_str(f"{p.in_flight} training, {p.steps} steps   " + "  ".join(
                    f"r={b.rank} [{b.lo or '?'}, {b.hi or '?'}]" for b in p.brackets), refresh=True)
        finally:
            bar.close()
    finally:
        restore()
    result = search_result(fs, p)
    took = time.perf_counter() - t0
    if args.json:
        print(json.dumps(result.to_dict() | {"seconds": took}))
        return 130 if flag.stop else 0
    state = "stopped (run the same command again to go on)" if flag.stop else "done"
    print(f"frontier search {search.id} {state}: {p.probes_done} probe{'s' if p.probes_done != 1 else ''}, "
          f"{p.steps} steps, {took:.0f} s")
    for row in result.rows():
        where = {"bracketed": f"between {row['lo']} and {row['hi']} tokens",
                 "at least": f"at least {row['lo']} tokens (the longest the data hold)",
                 "at most": f"under {row['hi']} tokens (even the shortest failed)",
                 "open": f"not yet bracketed ({row['lo'] or '?'} to {row['hi'] or '?'})"}[row["outcome"]]
        rates = [f"{n} token{'s' if n != 1 else ''} recalled by {row[k]:.0%} of seeds" for n, k in
                 ((row["lo"], "lo_rate"), (row["hi"], "hi_rate")) if n is not None]
        adjacent = row["outcome"] == "bracketed" and row["hi"] == row["lo"] + 1
        if adjacent and row["hi"] / row["lo"] > 1 + search.resolution:
            rates.append("adjacent lengths: as narrow as whole tokens allow")
        print(f"  rank {row['rank']:<4} ℓ* {where}   ("
              + "; ".join(rates + [f"{row['probes']} lengths, {row['steps']} steps"]) + ")")
    for line in budget_notes(result.probes):
        print(f"note: {line}")
    args.method = search.methods[0]
    if not store.runs(sweep=search.id, status="completed"):
        return 130 if flag.stop else 0
    print()
    df = law_table_of(argparse.Namespace(csv=None, method=args.method, model=None, sweep=search.id),
                    required=("rank", "length"))
    _print_frontier(args, df)
    print(f"\nthe probes are the runs of sweep {search.id}: `memcore frontier --sweep {search.id}`, "
          f"`memcore predict --verbatim --length N --sweep {search.id}`, `memcore fit --sweep {search.id}`")
    return 130 if flag.stop else 0


def _print_frontier(args: argparse.Namespace, df: Any) -> None:
    """Each method's frontier in `df` (or --method's) as text, or all of them as one JSON object (--json)."""
    from memcore.frontier import REFERENCE_BITS_PER_PARAM, frontier_from_table

    methods = [args.method] if args.method else (sorted(df["method"].unique()) if "method" in df.columns else [None])
    result = {}
    for m in methods:
        per_rank, fit, why = frontier_from_table(df, m)
        result[m or "all"] = {
            "per_rank": [vars(p) | {"recall_rate": {str(k): v for k, v in p.recall_rate.items()}} for p in per_rank],
            "fit": fit.to_dict() if fit else None, "fit_error": why,
            "fit_per_rank": [{"rank": p.rank, "ell_star": float(fit.ell_star(p.rank)),
                              "interval": list(fit.ell_star_interval(p.rank)),
                              "bits_per_param": fit.bits_per_param(p.rank)} for p in per_rank] if fit else None}
        if args.json:
            continue
        print(f"{m or 'all points'}: longest length recalled verbatim "
              "(recall rate crossing 1/2, interpolated in log ℓ)")
        for p in per_rank:
            rates = "  ".join(f"{k}:{v:.0%}" for k, v in p.recall_rate.items())
            sym = "≥" if p.bound == "at least" else "≤" if p.bound == "at most" else "≈"
            line = f"  rank {p.rank:<4} ℓ* {sym} {p.ell_star:7.1f} tokens"
            if p.bits_per_param is not None:
                line += f"   {p.bits_per_param:.3f} bits/param at P_eff {p.p_eff:,.0f}"
            if fit:
                lo, hi = fit.ell_star_interval(p.rank)
                line += f"   fitted {fit.ell_star(p.rank):.1f} [{lo:.1f}, {hi:.1f}]"
            print(line + f"   (recall by length  {rates})")
        if fit:
            lo, hi = fit.gamma_interval
            print(f"  fitted frontier ℓ*(r) = {math.exp(fit.a):.3g} · r^{fit.gamma:.3f}   γ 95% [{lo:.3f}, {hi:.3f}]   "
                  f"sharpness k {fit.k:.1f}   {fit.n} points")
            if fit.capacity_bits_per_token is not None:
                print(f"  counting {fit.capacity_bits_per_token:.2f} bits per recalled token, at the frontier that is "
                      + ", ".join(f"r={p.rank}: {fit.bits_per_param(p.rank):.3f}" for p in per_rank)
                      + " bits/param; references: "
                      + ", ".join(f"{v} ({k})" for k, v in REFERENCE_BITS_PER_PARAM.items()))
            for n in fit.notes:
                print(f"  note: {n}")
        else:
            print(f"  no fitted frontier: {why}")
    if args.json:
        print(json.dumps(result))
