"""The PhoneBook benchmark: capacity in facts. For each rank and method, the largest PhoneBook recalled entry by entry,
found by memcore's frontier search over the book's size (memcore.search, unit 'entries').

    python bench/bench_phonebook.py run    [--home DIR] [--keep DIR] [--ranks 1 2] [--seeds 0 1] [--batch-size 10]
                                           [--epochs 200]
    python bench/bench_phonebook.py report [--home DIR] [--out DIR]

Each probe is a PhoneBook of n entries ("Name: First Last\\nPhone:" -> " <10 digits>", the seed drawing the book)
trained as the paper trains PhoneBook: minibatches of --batch-size entries reshuffled every epoch, up to --epochs
epochs, lr --lr, the bypass adapter on the paper's layer, dropout 0.1; memft-sw is the inter-batch temporal
curriculum (five stages, ending at epochs 20, 40, 60, 80 of the 1-2k-token setting, scaled to --epochs / 200). A
probe stops once every entry is recalled (every teacher-forced argmax right), on a plateau of tokens above τ and
argmax-right tokens (--plateau-window steps without a new best), or at its epoch budget; a size counts as recalled
when at least half its seeds recall every entry.

`report` prints, per method and rank: the largest book recalled (the bracket [lo, hi] in entries, within
--resolution), facts and bits per parameter at it (a 10-digit number carries 10·log2(10) = 33.2 bits; P_eff of the
rank), against 2 and 3.6 bits/param; and entries recalled against book size over every probe. Runs resumably into
--home, every completed probe also kept under --keep (default sample_data/paper/phonebook_runs/<search id>:
bench/kept.py) and read back into a fresh --home, with the wall time of every invocation added up in kept.json
there; the same command with --ranks 1 2 4 8 16 32 64 --seeds 0 1 2 runs the paper's grid on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

from bench_memft import (  # noqa: E402  (one memcore home per benchmark, the default model linked in)
    as_of,
    bracket_words,
    hours_of,
    ledger_of,
    main_of,
    open_home,
    plateau_rule_check,
    probing_of,
    read_pairs,
    run_search,
    seeds_word,
    still_open,
    store_flags,
    to_go,
    training_words,
)

ROOT = Path(__file__).resolve().parent.parent
KEEP = ROOT / "sample_data" / "paper" / "phonebook_runs"
BITS_PER_ENTRY = 10 * math.log2(10)  # a uniformly random 10-digit number
METHODS = ("sft", "memft-ot", "memft-sw")
REFERENCE = {"Allen-Zhu & Li": 2.0, "Morris et al.": 3.6}
ABOUT = {  # each command's --help
    "run": "Search the largest PhoneBook recalled per method and rank into --home, resuming from what --home and "
           "--keep hold; SIGTERM or Ctrl-C stops after the current step.",
    "report": "Print the tables of the search the settings flags name (the same flags as its run; --home and "
              "--keep only say where it lies) and, with --out, write them as CSV.",
}


def settings(args: argparse.Namespace):
    from memcore.config import AdapterSpec, DataSpec, ModelSpec, RunSpec, TrainSpec
    from memcore.search import SearchSpec

    scale = args.epochs / 200
    stages: list[int] = []
    for e in (20, 40, 60, 80):  # the paper's stage ends scaled, each at least an epoch after the one before
        stages.append(max(round(e * scale), stages[-1] + 1 if stages else 1))
    stages = tuple(stages)
    most, data = args.most, DataSpec(phonebook=args.most)
    if args.jsonl:  # the paper's own PB file: a book of n entries is its first n
        pairs = read_pairs(args.jsonl, "phonebook", args.jsonl_fields)
        most, data = min(most, len(pairs)), DataSpec(pairs=pairs)
    template = RunSpec(model=ModelSpec(name=args.model) if args.model else ModelSpec(),
                       adapter=AdapterSpec(kind="bypass", rank=1, layers="paper", dropout=0.1),
                       data=data,
                       train=TrainSpec(lr=args.lr, batch_size=args.batch_size, until="converged", plateau_on="recall",
                                       plateau_window=args.plateau_window, curriculum_stages=5,
                                       curriculum_epochs=stages, history="decimated", max_steps=1))
    return SearchSpec(template=template, ranks=tuple(args.ranks), methods=tuple(args.methods), seeds=tuple(args.seeds),
                      resolution=args.resolution, unit="entries", epochs=args.epochs, start_length=args.start,
                      max_length=most)


def run(args: argparse.Namespace) -> int:
    from kept import Keeper, StopOnSignal, restore

    from memcore.search import FrontierSearch

    store = open_home(args.home)
    search = settings(args)
    args.keep = args.keep or KEEP / search.id
    t0 = time.perf_counter()
    print(f"search {search.id} into {args.home}; {restore(store, args.keep)} probes read back from {args.keep}",
          flush=True)
    keep = Keeper(store, search.id, args.keep, "bench/bench_phonebook.py", sys.argv[1:], t0)
    p = run_search(FrontierSearch(search, store, batch=args.batch, should_stop=StopOnSignal()), t0, on_progress=keep)
    print(keep.ended(p.stopped), flush=True)
    return 1 if p.stopped else 0


def most_recalled(df) -> dict[tuple[str, int], dict]:
    """Per (method, rank): the most entries any one book had recalled, as the mean over that book's seeds, with
    the book's size and its seeds (most_recalled, most_recalled_book, most_recalled_seeds; the smaller book on a
    tie). A second reading of capacity in facts beside the largest book recalled whole: a book past that one still
    holds entries, and its size need not be the one that holds the most (the epoch budget and the last partial
    batch change with the size). df: one row per probe (method, rank, entries, seed, entries_recalled)."""
    out = {}
    mean = df.groupby(["method", "rank", "entries"]).agg(recalled=("entries_recalled", "mean"),
                                                        seeds=("seed", "count")).reset_index()
    for (m, r), d in mean.groupby(["method", "rank"]):
        best = d.sort_values(["recalled", "entries"], ascending=[False, True]).iloc[0]
        out[(m, int(r))] = {"most_recalled": float(best["recalled"]), "most_recalled_book": int(best["entries"]),
                            "most_recalled_seeds": int(best["seeds"])}
    return out


def same_books(df):
    """Each method minus sft on the same books, per rank: over every (book size, seed) both searches trained (the
    seed draws the book, so both saw the same entries), the entries recalled and the share of the book recalled,
    as a mean with a 95% paired-t interval (memcore.frontier.paired_differences, each pair keyed by its book and
    seed; Student's t with n − 1 degrees of freedom over the n books both trained). The books are those both
    searches happened to probe, near their own frontiers, so this reads "on the books both trained", not "on
    every book". df: one row per probe (method, rank, entries, seed, entries_recalled). Returns the paired rows
    (method, rank, measure, n, mean, lo, hi, baseline_mean, method_mean, verdict), empty without sft."""
    import pandas as pd

    from memcore.frontier import paired_differences

    if "sft" not in set(df["method"]) or df["method"].nunique() < 2:
        return pd.DataFrame()
    d = df.assign(share_recalled=df["entries_recalled"] / df["entries"],
                  seed=[f"{n}/{s}" for n, s in zip(df["entries"], df["seed"])])
    return paired_differences(d, ("entries_recalled", "share_recalled"), by=("rank",))


def report(args: argparse.Namespace) -> int:
    import pandas as pd
    from kept import restore

    from memcore.search import FrontierSearch

    store = open_home(args.home)
    search = settings(args)
    args.keep = args.keep or KEEP / search.id
    restore(store, args.keep)
    fs = FrontierSearch(search, store, batch=1)
    fs.read()  # every verdict already in the store: nothing trained
    rows = []
    for r in store.runs(sweep=search.id, status="completed"):
        s, v = r["summary"], json.loads(r["label"])
        rows.append({"run_id": r["id"], "method": v["method"], "rank": v["rank"], "entries": v["length"],
                     "seed": v["seed"],
                     "entries_recalled": s.samples_recalled, "exact_recall": bool(s.exact_recall),
                     "token_accuracy": s.token_accuracy, "frac_above": s.n_above / s.n_tokens,
                     "delta_loss": s.delta_loss, "steps": s.steps, "stop_reason": s.stop_reason, "p_eff": s.p_eff})
    df = pd.DataFrame(rows)
    if df.empty:
        print(f"no completed probes of {search.id} in {args.home}: run `bench_phonebook.py run` first")
        return 1
    print(f"search {search.id}: {len(df)} probes, {int(df['steps'].sum())} steps")
    print("\n## The largest PhoneBook recalled entry by entry (recall rate over seeds at the bracket's ends)")
    cap = []
    known = df.dropna(subset=["p_eff"]).drop_duplicates("rank")
    per_rank = float(known["p_eff"].iloc[0]) / int(known["rank"].iloc[0]) if len(known) else None  # P_eff ∝ r
    unsettled = fs.unsettled()  # their lo is only what is recalled so far: a lower bound
    most = most_recalled(df)
    for b in fs.brackets:
        p_eff = round(per_rank * b.rank) if per_rank else None
        facts = b.lo
        bpp = facts * BITS_PER_ENTRY / p_eff if facts and p_eff else None
        settled = b not in unsettled
        row = {"method": b.method, "rank": b.rank, "lo": b.lo, "hi": b.hi, "lo_rate": b.rate(b.lo),
               "hi_rate": b.rate(b.hi), "lo_seeds": b.seeds_at(b.lo), "hi_seeds": b.seeds_at(b.hi), "facts": facts,
               "p_eff": p_eff, "bits_per_param": bpp,
               "settled": settled, **most.get((b.method, b.rank), {}),
               **probing_of(fs, b.method, b.rank)}
        if row.get("most_recalled") is not None and p_eff:
            row["most_recalled_bits_per_param"] = row["most_recalled"] * BITS_PER_ENTRY / p_eff
        cap.append(row)
        where = bracket_words(b.lo, b.hi, row["lo_rate"], row["hi_rate"], "entries",
                              (row["lo_seeds"], row["hi_seeds"], len(search.seeds))).replace("ℓ*", "the largest book")
        where += training_words(row, f"a book of {row['probing']}")
        stored = (f"; {'' if settled else 'at least '}{facts} facts = {facts * BITS_PER_ENTRY:.0f} bits over P_eff "
                  f"{p_eff}{' =' if settled else ', so at least'} {bpp:.3f} bits/param "
                  f"(against {', '.join(f'{v} ({k})' for k, v in REFERENCE.items())})" if bpp is not None else "")
        print(f"  {b.method:<9} rank {b.rank}: {where}{stored}")
        if row.get("most_recalled") is not None:
            print(f"  {'':<9}         the most entries any book had recalled{'' if settled else ' so far'}: "
                  f"{row['most_recalled']:g} of "
                  f"{row['most_recalled_book']} ("
                  + (f"mean over {seeds_word(n)}" if (n := row['most_recalled_seeds']) > 1 else "1 seed so far") + ")"
                  + (f" = {row['most_recalled_bits_per_param']:.3f} bits/param" if p_eff else ""))
    print("\n## Entries recalled against book size (mean over seeds)")
    t = df.assign(method=pd.Categorical(df["method"], list(dict.fromkeys([*METHODS, *df["method"]])), ordered=True)) \
        .groupby(["method", "rank", "entries"], observed=True).agg(entries_recalled=("entries_recalled", "mean"),
                                                      seeds=("seed", "count"), steps=("steps", "mean")).reset_index()
    for _, r in t.iterrows():
        print(f"  {r['method']:<9} rank {r['rank']} book {r['entries']:>4}: {r['entries_recalled']:.1f} recalled "
              f"({seeds_word(r['seeds'])}, {r['steps']:.0f} steps)")
    rule = plateau_rule_check(store, df, args.plateau_window)
    print(f"\n## The plateau rule against the curves (a probe stops after {args.plateau_window} steps without a new "
          "best in tokens above τ or argmax-right tokens)")
    for _, r in rule.iterrows():
        print(f"  {r['method']:<9} {r['points']:>3} probes ran on to recall or the budget: the longest wait for a new "
              f"best {r['longest_wait']} steps; {r['cut_short']} would have been cut short. {r['plateau_stops']} "
              f"probes stopped on it; of {r['failed']} not recalled, {r['budget_stops']} ran out of the "
              f"{args.epochs}-epoch budget instead.")
    if len(rule) and rule["failed"].sum() and rule["budget_stops"].sum() == rule["failed"].sum():
        print(f"  Every probe not recalled ran out of its {args.epochs} epochs while still improving: the capacities "
              f"above are what {args.epochs} epochs at lr {args.lr} reach, lower bounds on what the adapter holds.")
    paired = same_books(df)
    if len(paired):
        print("\n## MemFT against SFT on the same books (method − sft over every book size and seed both trained; "
              "mean, 95% paired-t interval)")
        for _, r in paired.iterrows():
            what = "entries recalled" if r["measure"] == "entries_recalled" else "share of the book recalled"
            span = (f"[{r['lo']:+8.2f}, {r['hi']:+8.2f}]" if pd.notna(r["lo"]) else "(one book: no interval)")
            print(f"  {r['method']:<9} rank {r['rank']}  {what:<27} {r['mean']:+7.2f} {span}  ({r['method_mean']:.2f} "
                  f"vs {r['baseline_mean']:.2f} over {r['n']} books)  {r['verdict']}")
    open_ = still_open(fs)
    left = to_go(fs, ledger_of(args.keep), df.rename(columns={"entries": "length"}), unit="entry")
    state = ("complete" if not open_ else f"interim: {len(open_)} capacit{'ies' if len(open_) != 1 else 'y'} not yet "
             f"placed within {search.resolution:.0%} ({', '.join(open_)}); " + left)
    print(f"\n{state}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        df.drop(columns=["run_id"]).to_csv(out / "phonebook_points.csv", index=False)
        pd.DataFrame(cap).to_csv(out / "phonebook_capacity.csv", index=False)
        rule.to_csv(out / "phonebook_plateau_rule.csv", index=False)
        paired.to_csv(out / "phonebook_paired.csv", index=False)
        ledger = ledger_of(args.keep)
        side = {"search": search.id, "ranks": list(search.ranks), "methods": list(search.methods),
                "seeds": list(search.seeds), "resolution": search.resolution, "batch_size": args.batch_size,
                "epochs": args.epochs, "lr": args.lr, "probes": int(len(df)), "steps": int(df["steps"].sum()),
                "state": state, "command": ledger.get("command"), "wall_s": ledger.get("wall_s"), "as_of": as_of(),
                "note": f"{len(df)} probes of search {search.id}, seeds {', '.join(map(str, search.seeds))}, "
                        f"{hours_of(ledger.get('wall_s'))} of training on this CPU, as of {as_of()}"}
        (out / "phonebook.json").write_text(json.dumps(side, indent=2) + "\n")
        print(f"\nwrote {out}/phonebook_{{points,capacity,plateau_rule,paired}}.csv and phonebook.json")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "report"):
        p = sub.add_parser(name, description=ABOUT[name])
        store_flags(p, "memcore-bench-phonebook", "sample_data/paper/phonebook_runs",
                    jsonl="the paper's own PhoneBook file (query/target lines) instead of generated books: a book of "
                          "n entries is its first n, the largest the file's size (or --most)",
                    fields="query,target")
        p.add_argument("--ranks", type=int, nargs="+", default=[1, 2],
                       help="adapter ranks (default: %(default)s)")
        p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                       help="seeds; seed s draws the same book for every method (default: %(default)s)")
        p.add_argument("--methods", nargs="+", default=list(METHODS),
                       help="methods; sft is the baseline (default: %(default)s)")
        p.add_argument("--batch-size", type=int, default=10, help="entries per training step (default: %(default)s)")
        p.add_argument("--epochs", type=int, default=200, help="epoch budget per probe (default: %(default)s)")
        p.add_argument("--lr", type=float, default=1e-2, help="learning rate (default: %(default)s)")
        p.add_argument("--plateau-window", type=int, default=200,
                       help="steps without a new best in tokens above τ or argmax-right tokens that end a probe "
                            "(default: %(default)s)")
        p.add_argument("--resolution", type=float, default=0.1,
                       help="the largest book is placed within this fraction of its size (default: %(default)s)")
        p.add_argument("--start", type=int, default=8,
                       help="entries of the first probe at rank 1, times the rank (default: %(default)s)")
        p.add_argument("--most", type=int, default=1000, help="the largest book searched (default: %(default)s)")
        if name == "run":
            p.add_argument("--batch", type=int, default=8, help="probes trained together (default: %(default)s)")
        if name == "report":
            p.add_argument("--out", help="write the tables as CSV files here")
    args = ap.parse_args()
    return main_of({"run": run, "report": report}[args.cmd], args)


if __name__ == "__main__":
    raise SystemExit(main())
